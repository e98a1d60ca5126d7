"""A captioner backend: a Hugging Face transformers vision-language model in a local folder, run in the paper's two
stages (:class:`onestory_jax.data.curation.captions.TwoStageCaptioner`).

Any model that ``AutoProcessor`` and ``AutoModelForImageTextToText`` load, and whose processor has a chat template
that takes several images in one user turn, works: LLaVA-style models, and Qwen2-VL / Qwen2.5-VL where torchvision
is installed (building a Qwen2-VL processor failed here without it, on its video part; this project does not
install torchvision). Each shot is shown as the ``caption_frames`` frames (default 4) that curation spreads over its
clip, so a rewrite shows twice that many. Nothing is downloaded: the folder must hold the model and its processor
(``save_pretrained``). transformers and torch are imported when the model is first used; they are in the ``test``
extra, not in the runtime requirements.

The prompts are ours (the paper does not publish its own): stage 1 asks for one sentence about who is in the shot,
what they look like and do, and where; stage 2 shows the previous shot's frames and caption next to this shot's and
asks for the caption rewritten to refer back ("the same man, now ...").
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import numpy as np

from onestory_jax.data.curation import captions

CAPTION_PROMPT = (
    "The images are frames of one shot of a video, in order. Describe the shot in one sentence: who or what is in "
    "it, what they look like, what they do, and where. Answer with the sentence only."
)
REWRITE_PROMPT = (
    "The first {previous_images} images are frames of the previous shot of a video, described as: "
    '"{previous_caption}". The last {images} images are frames of the next shot, described on its own as: '
    '"{caption}". Rewrite the description of the next shot as one sentence that refers back to the previous shot: '
    'call people, animals, objects and places that appear in both "the same ...", and say what changed. Answer with '
    "the sentence only."
)


class VlmCaptioner(captions.TwoStageCaptioner):
  """Two-stage captions from a local transformers vision-language model (module docstring).

  Args:
    model_dir: folder with the model and its processor.
    max_new_tokens: longest caption, in tokens.
    device: torch device ('cpu', 'cuda', ...).
    dtype: torch dtype name of the weights ('float32', 'bfloat16', ...).
  """

  def __init__(
      self,
      model_dir: str,
      max_new_tokens: int = 96,
      device: str = "cpu",
      dtype: str = "float32",
  ):
    self.model_dir = os.path.abspath(model_dir)
    if not os.path.isfile(os.path.join(self.model_dir, "config.json")):
      raise ValueError(f"--captioner: {model_dir} is not a model folder (no config.json)")
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
      raise ValueError(f"--captioner needs {' and '.join(missing)}: pip install -e '.[test]'")
    if dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"--captioner_dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if max_new_tokens < 1:
      raise ValueError(f"VlmCaptioner: max_new_tokens must be >= 1, got {max_new_tokens}")
    self.max_new_tokens = int(max_new_tokens)
    self.device, self.dtype = device, dtype
    self._model = self._processor = None

  def __getstate__(self) -> dict[str, Any]:  # workers load their own copy
    return {**self.__dict__, "_model": None, "_processor": None}

  def cache_key(self, video: str) -> Any:
    del video
    with open(os.path.join(self.model_dir, "config.json"), "rb") as f:
      config = hashlib.sha256(f.read()).hexdigest()[:16]
    weights = sorted(
        (name, os.path.getsize(os.path.join(self.model_dir, name)))
        for name in os.listdir(self.model_dir)
        if name.endswith((".safetensors", ".bin"))
    )
    return {
        "vlm": self.model_dir,
        "config": config,
        "weights": weights,
        "prompts": [CAPTION_PROMPT, REWRITE_PROMPT],
        "max_new_tokens": self.max_new_tokens,
    }

  def load(self) -> None:
    """Loads the processor and the model (done on first use; call it to find a broken folder early)."""
    if self._model is not None:
      return
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    transformers.utils.logging.disable_progress_bar()  # curation has its own progress bar
    self._processor = transformers.AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
    if not getattr(self._processor, "chat_template", None):
      raise ValueError(f"{self.model_dir}: the processor has no chat template")
    self._model = transformers.AutoModelForImageTextToText.from_pretrained(
        self.model_dir, local_files_only=True, dtype=getattr(torch, self.dtype)
    )
    self._model.to(self.device).eval()

  def generate(self, images: list[np.ndarray], prompt: str) -> str:
    """The model's greedy answer to ``prompt`` about ``images`` (uint8 [H, W, 3] each), stripped."""
    self.load()
    import torch  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = self._processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = self._processor(text=[text], images=[Image.fromarray(i) for i in images], return_tensors="pt")
    inputs = inputs.to(self.device)
    if self.dtype != "float32":
      inputs = inputs.to(getattr(torch, self.dtype))  # the floating-point inputs (pixels) only
    with torch.inference_mode():
      out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
    answer = self._processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return " ".join(answer.split())

  def caption(self, frames: np.ndarray) -> str:
    return self.generate(list(frames), CAPTION_PROMPT)

  def rewrite(self, caption: str, frames: np.ndarray, previous_caption: str, previous_frames: np.ndarray) -> str:
    before, now = list(previous_frames), list(frames)
    prompt = REWRITE_PROMPT.format(
        previous_images=len(before),
        previous_caption=previous_caption,
        images=len(now),
        caption=caption,
    )
    return self.generate(before + now, prompt)
