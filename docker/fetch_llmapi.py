"""Fetch TensorRT-LLM's Triton llmapi model files and launcher at a release tag (run at image build time)."""

import sys
import urllib.request
from pathlib import Path

FILES = (
    "triton_backend/all_models/llmapi/tensorrt_llm/1/model.py",
    "triton_backend/all_models/llmapi/tensorrt_llm/1/helpers.py",
    "triton_backend/scripts/launch_triton_server.py",
)


def main(tag: str, root: str) -> None:
    for path in FILES:
        url = f"https://raw.githubusercontent.com/NVIDIA/TensorRT-LLM/{tag}/{path}"
        target = Path(root) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - a fixed https URL
            target.write_bytes(response.read())
        print(f"fetched {path} ({target.stat().st_size} bytes) at {tag}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
