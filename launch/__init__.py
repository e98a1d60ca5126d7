"""Launch scripts: `python launch/cli.py` (Cloud TPU VMs through gcloud, GPU nodes through ssh)."""
