"""GuideLLM, unmodified, against an OpenAI-compatible server: a third-party client's numbers beside `compactlm bench`.

GuideLLM 0.8.1 needs numpy 2 (compactlm pins numpy < 2), so it lives in its own venv (core/toolvenv.py), made once.
`run_guidellm` writes a scenario (a closed loop of `streams` streams, synthetic text prompts of `prompt_tokens`
tokens counted by the served model's own tokenizer, `output_tokens` tokens each, `requests` requests), runs
`guidellm run` on it and reads its JSON report back into one flat dict: its own headline request rate (the mean of
its request-rate time series, what its console shows), the completed requests over the measured span
(`compactlm bench`'s definition), TTFT/ITL percentiles, per-request token counts and error counts.

    python -m compactlm.bench.guidellm URL --model NAME --tokenizer DIR [--route /v1/chat/completions] \\
        [--streams 8] [--requests 32] [--prompt-tokens 96] [--output-tokens 128] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from compactlm.core import procs, toolvenv
from compactlm.core.errors import CompactLMError
from compactlm.core.toolvenv import ToolVenv

VERSION = "0.8.1"
GUIDELLM = ToolVenv("GuideLLM", installs=((f"guidellm=={VERSION}",),), check="import guidellm", minutes=2)
VENV_ENV = "COMPACTLM_GUIDELLM_VENV"
ROUTES = ("/v1/chat/completions", "/v1/completions")


def venv_dir() -> Path:
    """$COMPACTLM_GUIDELLM_VENV, else $COMPACTLM_HOME/venvs/guidellm-VERSION."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser()
    from compactlm.compress.models import compactlm_home

    return compactlm_home() / "venvs" / f"guidellm-{VERSION}"


def ensure_guidellm(quiet: bool = False) -> list[str]:
    """The command that runs GuideLLM (its venv's python -m guidellm), making the venv first if needed (~2 min,
    once; needs the package registry)."""
    return [str(toolvenv.ensure(GUIDELLM, venv_dir(), quiet=quiet)), "-m", "guidellm"]


@dataclass(frozen=True)
class GuideLLMRun:
    url: str
    """The server's root (http://HOST:PORT), without the route."""
    model: str
    tokenizer: Path
    """The served model's tokenizer folder: GuideLLM sizes its synthetic prompts with it."""
    route: str = "/v1/chat/completions"
    streams: int = 8
    requests: int = 32
    prompt_tokens: int = 96
    output_tokens: int = 128

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")) or "/v1" in self.url:
            raise ValueError(f"url must be the server's root, like http://127.0.0.1:8000 (got {self.url!r})")
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)} (got {self.route!r})")
        for name in ("streams", "requests", "prompt_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not Path(self.tokenizer).is_dir():
            raise ValueError(f"tokenizer must be a tokenizer folder (got {self.tokenizer})")

    def scenario(self) -> dict:
        return {
            "spec": {
                "backend": {
                    "kind": "openai_http",
                    "target": self.url,
                    "model": self.model,
                    "request_format": self.route,
                },
                "profile": {"kind": "concurrent", "streams": self.streams},
                "tokenizer": {"kind": "huggingface_auto", "model": str(Path(self.tokenizer).resolve())},
                "data": [
                    {
                        "kind": "synthetic_text",
                        "prompt_tokens": self.prompt_tokens,
                        "output_tokens": self.output_tokens,
                    }
                ],
                "constraints": [{"kind": "max_requests", "count": self.requests}],
            }
        }


def summarize(report: dict) -> dict:
    """One flat dict of a GuideLLM JSON report's (first) benchmark."""
    bench = report["benchmarks"][0]
    metrics, totals = bench["metrics"], bench["metrics"]["request_totals"]
    done = bench["requests"]["successful"]
    duration = float(bench["duration"])

    def stat(name: str, key: str) -> float | None:
        value = (metrics.get(name) or {}).get("successful") or {}
        if key.startswith("p"):
            value = value.get("percentiles") or {}
        return None if value.get(key) is None else float(value[key])

    return {
        "guidellm_version": report.get("metadata", {}).get("guidellm_version"),
        "successful": int(totals["successful"]),
        "errored": int(totals["errored"]),
        "incomplete": int(totals["incomplete"]),
        "duration_s": duration,
        "req_per_s": stat("requests_per_second", "mean"),
        "completed_per_s": len(done) / duration if duration > 0 else None,
        "ttft_ms_p50": stat("time_to_first_token_ms", "median"),
        "ttft_ms_mean": stat("time_to_first_token_ms", "mean"),
        "ttft_ms_p99": stat("time_to_first_token_ms", "p99"),
        "itl_ms_p50": stat("inter_token_latency_ms", "median"),
        "output_tokens": [r.get("output_tokens") for r in done],
        "prompt_tokens": [r.get("prompt_tokens") for r in done],
    }


def run_guidellm(spec: GuideLLMRun, out_dir: Path, cpus: str | None = None, timeout: float = 900) -> dict:
    """Run GuideLLM on SPEC, keeping its scenario, console log and JSON report in OUT_DIR; the report, summarized.

    `cpus` pins GuideLLM to those CPUs (taskset syntax), so that its own CPU use stays off an engine pinned
    elsewhere."""
    guidellm = ensure_guidellm()
    out_dir.mkdir(parents=True, exist_ok=True)
    scenario, report, log = out_dir / "scenario.json", out_dir / "guidellm.json", out_dir / "guidellm.txt"
    scenario.write_text(json.dumps(spec.scenario(), indent=1) + "\n")
    report.unlink(missing_ok=True)
    command = [*guidellm, "run", "--scenario", str(scenario), "--disable-console-interactive"]
    command += ["--output", f"kind=json,path={report}"]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as handle:
        try:
            code = procs.run(command, stdout=handle, stderr=handle, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired as exc:
            raise CompactLMError(f"GuideLLM did not finish within {timeout:.0f} s (its log: {log})") from exc
    if code != 0 or not report.is_file():
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise CompactLMError(f"GuideLLM failed (exit {code}; its log: {log}):\n{tail}")
    return summarize(json.loads(report.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server's root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--route", default="/v1/chat/completions", choices=ROUTES)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--cpus", help="pin GuideLLM to these CPUs (taskset -c syntax)")
    parser.add_argument("--out", type=Path, required=True, help="folder for its scenario, log and report")
    args = parser.parse_args()
    try:
        spec = GuideLLMRun(
            args.url.rstrip("/"),
            args.model,
            args.tokenizer,
            args.route,
            args.streams,
            args.requests,
            args.prompt_tokens,
            args.output_tokens,
        )
        summary = run_guidellm(spec, args.out, cpus=args.cpus)
    except (ValueError, CompactLMError) as exc:
        raise SystemExit(f"error: {exc}") from None
    summary["spec"] = {k: str(v) for k, v in asdict(spec).items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main()
