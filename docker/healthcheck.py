"""The image's health check: trtllm-serve answers /health, Triton /v2/health/ready (whichever MODE runs)."""

import sys
import urllib.request

PORT = sys.argv[1] if len(sys.argv) > 1 else "8000"
for path in ("/health", "/v2/health/ready"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=4) as response:  # noqa: S310
            if response.status == 200:
                sys.exit(0)
    except OSError:
        continue
sys.exit(1)
