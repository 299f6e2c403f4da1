"""Helpers shared by every test: tiny random models of each family, tokenizers and corpora, the CLI runner,
and the clients of the `compactlm serve` tests (free loopback ports, Triton gRPC/HTTP streams, the OpenAI route).
Fixtures live in tests/unit/conftest.py."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from compactlm.serve.protocol import (
    TRITON_FINAL,
    TRITON_IGNORE_EOS,
    TRITON_INPUT_IDS,
    TRITON_MAX_TOKENS,
    TRITON_MODEL,
    TRITON_OUTPUT_IDS,
    TRITON_TEXT_INPUT,
    TRITON_TEXT_OUTPUT,
)

REPO = Path(__file__).resolve().parents[1]
"""The repository's root."""

CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "granite": GraniteConfig,
    "olmo2": Olmo2Config,
    "phi3": Phi3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
    "mixtral": MixtralConfig,
    "qwen2_moe": Qwen2MoeConfig,
    "qwen3_moe": Qwen3MoeConfig,
}
ARCHITECTURES = {"gemma3_text": "Gemma3ForCausalLM"}
"""Where the class name is not the config's name with ForCausalLM."""


def _quirks(family: str, layers: int) -> dict:
    """Each family's own features switched on, so that the tests exercise them: Granite's multipliers, Gemma's
    sliding/full layer pattern with a window shorter than the test sequences, soft-capping and its attention scalar,
    Phi-3's special tokens inside the tiny vocabulary."""
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return {
        "granite": dict(
            embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0
        ),
        "phi3": dict(bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "gemma2": dict(
            sliding_window=8,
            layer_types=alternating,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        "gemma3_text": dict(sliding_window=8, layer_types=alternating, query_pre_attn_scalar=16),
        # Mixtures of experts: 8 routed experts, top-2; Mixtral's intermediate_size is its experts' width.
        "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
        # Qwen2-MoE: a shared expert, one dense layer among the MoE ones, top-k weights left unnormalized.
        "qwen2_moe": dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[layers - 2] if layers > 1 else [],
            norm_topk_prob=False,
        ),
        "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    }.get(family, {})


def tiny_config(family: str = "llama", **overrides):
    """2-4 layers, hidden 48, 6 heads in 3 KV groups with head_dim 16 (hidden != heads*head_dim... on purpose
    where allowed), vocab 256, and the family's quirks on (`_quirks`)."""
    kwargs = dict(
        vocab_size=256,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    kwargs.update(_quirks(family, overrides.get("num_hidden_layers", 4)))
    kwargs.update(overrides)
    config = CONFIGS[family](**kwargs)
    config.architectures = [ARCHITECTURES.get(family, f"{CONFIGS[family].__name__.removesuffix('Config')}ForCausalLM")]
    return config


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init has tiny weights; scale them up a little so that units differ clearly in importance.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:  # matrices, and the experts' stacked [experts, rows, cols] ones
                p.normal_(0, 0.2)
    return model.eval()


def random_tokens(n: int = 8, length: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding), never stopping at EOS."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
            )
        out.append(gen[0, len(prompt) :].tolist())
    return out


MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
"""Mixtures of experts: their own tests (tests/unit/compress/test_moe.py), since their layers have no dense MLP to
zero neurons of (or only some layers have one)."""
FAMILIES = tuple(f for f in CONFIGS if f not in MOE)
"""The dense families, which every prune test runs on."""
FUSED = ("phi3",)
"""Families with one qkv_proj and one gate_up_proj per layer."""
GEMMA = ("gemma2", "gemma3_text")
FULL_QK_NORM = ("olmo2",)
"""q/k norms over all heads' projections: dropping a head changes the others' normalization, so head pruning is
never exact there."""

ATOL = 1e-5
"""Removing a unit that contributes exactly zero changes only the order of float sums."""


@torch.inference_mode()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits


def expected_state_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter a model of this config must have, with its shape (derived here, not by the library)."""
    family = config.model_type
    d, f = config.hidden_size, config.intermediate_size
    h, g, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    attention_bias = bool(getattr(config, "attention_bias", False))  # Llama/Qwen3/Granite/OLMo 2/Gemma: q/k/v/o
    qkv_bias = family == "qwen2" or attention_bias  # Qwen2: q/k/v only, always
    norms = {
        "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
        "gemma2": (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
    }
    norms["gemma3_text"] = norms["gemma2"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (config.vocab_size, d),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if family in FUSED:
            shapes |= {
                p + "self_attn.qkv_proj.weight": ((h + 2 * g) * hd, d),
                p + "mlp.gate_up_proj.weight": (2 * f, d),
            }
        else:
            shapes |= {
                p + "self_attn.q_proj.weight": (h * hd, d),
                p + "self_attn.k_proj.weight": (g * hd, d),
                p + "self_attn.v_proj.weight": (g * hd, d),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
            }
        shapes |= {p + "self_attn.o_proj.weight": (d, h * hd), p + "mlp.down_proj.weight": (d, f)}
        shapes |= {
            p + f"{norm}.weight": (d,) for norm in norms.get(family, ("input_layernorm", "post_attention_layernorm"))
        }
        if qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (h * hd,),
                p + "self_attn.k_proj.bias": (g * hd,),
                p + "self_attn.v_proj.bias": (g * hd,),
            }
        if attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if getattr(config, "mlp_bias", False):
            shapes |= {
                p + "mlp.gate_proj.bias": (f,),
                p + "mlp.up_proj.bias": (f,),
                p + "mlp.down_proj.bias": (d,),
            }
        if family in ("qwen3", "gemma3_text"):
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if family in FULL_QK_NORM:
            shapes |= {p + "self_attn.q_norm.weight": (h * hd,), p + "self_attn.k_norm.weight": (g * hd,)}
    return shapes


def value_rows(layer, group: int, head_dim: int) -> tuple[torch.nn.Linear, slice]:
    """The projection that holds KV group `group`'s value rows in a decoder `layer`, and those rows."""
    attn = layer.self_attn
    if hasattr(attn, "qkv_proj"):  # [q; k; v]
        q_rows = attn.o_proj.in_features
        kv_rows = (attn.qkv_proj.out_features - q_rows) // 2
        start = q_rows + kv_rows + group * head_dim
        return attn.qkv_proj, slice(start, start + head_dim)
    return attn.v_proj, head_cols(group, head_dim)


def zero_neurons(layer, neurons: list[int]) -> None:
    """Zero the gate and up rows of MLP `neurons` in a decoder `layer` (separate or fused [gate; up])."""
    mlp = layer.mlp
    if hasattr(mlp, "gate_up_proj"):
        f = mlp.down_proj.in_features
        mlp.gate_up_proj.weight[[*neurons, *(f + n for n in neurons)]] = 0
    else:
        mlp.gate_proj.weight[neurons] = 0
        mlp.up_proj.weight[neurons] = 0


def state_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def head_cols(head: int, head_dim: int) -> slice:
    return slice(head * head_dim, (head + 1) * head_dim)


class CharTokenizer:
    """A stand-in for a HF tokenizer: one id per character (ord), EOS = 0; counts its calls."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        self.calls += 1
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


WORDS = (
    "the model reads a page of text and learns which word comes next while the pruned student keeps the "
    "layers heads and neurons that matter most for the loss on held out documents"
).split()


def english_docs(n: int, words_per_doc: int = 40, seed: int = 0) -> list[str]:
    """Deterministic English-ish documents over a small vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (words_per_doc,), generator=gen).tolist()
        docs.append(" ".join(WORDS[i] for i in idx) + ".")
    return docs


def save_word_tokenizer(folder: Path, texts: list[str]) -> None:
    """Train a tiny word-level tokenizer (vocab <= 256) on `texts` and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=256, special_tokens=["<unk>", "<eos>"]))
    assert tok.get_vocab_size() <= 256
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)


def cli(*args):
    """Run `compactlm ARGS...` in-process (typer's CliRunner); returns the click Result."""
    from typer.testing import CliRunner

    from compactlm.cli.root import app

    return CliRunner().invoke(app, [str(a) for a in args])


def small_run(corpus: Path, steps: int = 3, eval_samples: int | None = 2) -> list[str]:
    """Options of a seconds-long retraining run on a tiny model: 16-token rows, batch 2, held-out on 2 rows."""
    args = ["--data", str(corpus), "--steps", str(steps), "--seq-len", "16", "--batch-size", "2"]
    return args + (["--eval-samples", str(eval_samples)] if eval_samples is not None else [])


HOST = "127.0.0.1"


def tiny_engine(root):
    """A tiny Llama with a word tokenizer, built as a torch engine (seconds): what the serving tests serve."""
    from compactlm.engines import BuildConfig, Limits, build_engine
    from tests.helpers import english_docs, save_word_tokenizer, tiny_model

    tiny_model("llama").save_pretrained(root / "ckpt")
    save_word_tokenizer(root / "ckpt", english_docs(40))
    limits = Limits(max_batch_size=8, max_input_len=48, max_seq_len=96, max_num_tokens=256)
    return build_engine(root / "ckpt", root / "tiny", BuildConfig(backend="torch", limits=limits))


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now (bound to port 0, then released)."""
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def triton_inputs(module, ids=None, text=None, max_tokens=None, ignore_eos=True, batched=False, dtype="INT32"):
    """tritonclient InferInputs of the protocol (module: tritonclient.grpc or .http); None leaves one out."""
    tensors = []
    if ids is not None:
        tensors.append((TRITON_INPUT_IDS, np.asarray(ids, dtype=np.int32 if dtype == "INT32" else np.float32), dtype))
    if text is not None:
        tensors.append((TRITON_TEXT_INPUT, np.asarray([text.encode()], dtype=object), "BYTES"))
    if max_tokens is not None:
        tensors.append((TRITON_MAX_TOKENS, np.asarray([max_tokens], dtype=np.int32), "INT32"))
    if ignore_eos is not None:
        tensors.append((TRITON_IGNORE_EOS, np.asarray([ignore_eos]), "BOOL"))
    inputs = []
    for name, array, kind in tensors:
        array = array[None, :] if batched else array
        tensor = module.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class GrpcStream:
    """One tritonclient gRPC stream: `generate(...)` returns (token ids, text, error) of one request."""

    def __init__(self, port: int):
        import tritonclient.grpc as grpcclient

        self.module = grpcclient
        self.client = grpcclient.InferenceServerClient(f"{HOST}:{port}")
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def generate(self, timeout: float = 60, **inputs) -> tuple[list[int], str, str | None]:
        self.client.async_stream_infer(
            TRITON_MODEL, triton_inputs(self.module, **inputs), enable_empty_final_response=True
        )
        ids, text = [], ""
        while True:
            result, error = self.responses.get(timeout=timeout)
            if error is not None:
                return ids, text, str(error)
            response = result.get_response()
            out = result.as_numpy(TRITON_OUTPUT_IDS)
            if out is not None:
                ids += out.tolist()
            pieces = result.as_numpy(TRITON_TEXT_OUTPUT)
            if pieces is not None:
                text += b"".join(pieces.reshape(-1)).decode()
            final = response.parameters.get(TRITON_FINAL)
            if final is not None and final.bool_param:
                return ids, text, None

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def post(port: int, path: str, body, timeout: float = 60) -> tuple[int, bytes]:
    """POST a JSON body (or raw bytes) and read the whole answer."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, raw = response.status, response.read()
    conn.close()
    return status, raw


def sse(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]


def triton_http_stream(port: int, body: dict) -> tuple[int, list[dict]]:
    status, raw = post(port, f"/v2/models/{TRITON_MODEL}/generate_stream", body)
    return status, [json.loads(event) for event in sse(raw)]


def openai_stream(port: int, body: dict) -> tuple[list[int], str, str | None, dict | None]:
    """A streaming /v1/completions: (token ids, text, finish_reason, usage); fails on a missing [DONE]."""
    status, raw = post(port, "/v1/completions", {**body, "stream": True})
    assert status == 200, raw
    events = sse(raw)
    assert events[-1] == "[DONE]", events[-3:]
    ids, text, finish, usage = [], "", None, None
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            ids += choice["token_ids"]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return ids, text, finish, usage


def wait_ready(http_port: int, openai_port: int | None, timeout: float = 120, process=None) -> None:
    """Wait until Triton's models answer ready (and the OpenAI route its health), or fail."""
    urls = [f"http://{HOST}:{http_port}/v2/models/{TRITON_MODEL}/ready"]
    if openai_port:
        urls.append(f"http://{HOST}:{openai_port}/health")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if all(urllib.request.urlopen(url, timeout=2).status == 200 for url in urls):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the server was not ready within {timeout} s")


def fake_brotli(path: Path, texts=None) -> Path:
    """A stand-in for brotli-1.2.1.tar.gz with the general-English texts (compactlm.compress.english) as plain
    English-like paragraphs, CRLF line ends as the real ones have."""
    import io
    import tarfile

    from compactlm.compress.english import TEXTS

    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([*(TEXTS.values() if texts is None else texts), "unrelated.txt"]):
            body = "\r\n\r\n".join(english_docs(12, words_per_doc=120, seed=100 + i)).encode()
            info = tarfile.TarInfo(f"brotli-1.2.1/tests/testdata/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path
