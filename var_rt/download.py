"""Fetch the official checkpoints from the Hugging Face Hub (only for users with internet; never in tests)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from var_rt.config import get_preset
from var_rt.errors import VarRtError
from var_rt.files import check_writable_folder

REPO_ID = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"


def download(model: str, directory: str | Path = "checkpoints") -> List[Path]:
    get_preset(model)  # validates the name
    check_writable_folder(directory, "--dir", directory)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise VarRtError("downloading needs huggingface_hub, which the install line does not include: "
                         "python -m pip install 'huggingface_hub>=0.20' (in a checkout: python -m pip install "
                         "-e '.[download]'), then run this again") from None
    out = []
    for name in (f"var_{model}.pth", VAE_FILE):
        try:
            out.append(Path(hf_hub_download(REPO_ID, name, local_dir=str(directory))))
        except Exception as e:  # offline, DNS, HTTP errors all end here
            raise VarRtError(f"could not download {name} from the Hugging Face repository {REPO_ID} "
                             f"({type(e).__name__}); this needs internet access. Download it elsewhere "
                             f"and pass it with --var-ckpt/--vae-ckpt") from None
    return out
