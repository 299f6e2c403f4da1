"""Triton Python model `preprocessing`: text -> token ids for the tensorrt_llm model (compactlm's own, minimal).

Inputs QUERY (STRING [1]), REQUEST_OUTPUT_LEN (INT32 [1]), END_ID / PAD_ID (INT32 [1], optional); outputs
INPUT_ID (INT32 [-1], right-padded with the pad id), REQUEST_INPUT_LEN, REQUEST_OUTPUT_LEN, OUT_END_ID,
OUT_PAD_ID. Parameters: tokenizer_dir, add_special_tokens.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


def _param(config: dict, key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.tokenizer = AutoTokenizer.from_pretrained(_param(config, "tokenizer_dir"))
        self.add_special_tokens = _param(config, "add_special_tokens", "true").lower() == "true"
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos if eos is not None else 0)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.end_id)

    def _optional(self, request, name: str, default: int, batch: int) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return np.full((batch, 1), default, dtype=np.int32)
        return tensor.as_numpy().astype(np.int32).reshape(batch, 1)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # one bad request must not fail the others of the batch
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _one(self, request):
        queries = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
        batch = len(queries)
        output_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy()
        output_len = output_len.astype(np.int32).reshape(batch, 1)
        ids = []
        for query in queries:
            text = query.decode("utf-8") if isinstance(query, bytes) else str(query)
            tokens = self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens)
            if not tokens:
                raise ValueError("the prompt is empty")
            ids.append(tokens)
        end_id = self._optional(request, "END_ID", self.end_id, batch)
        pad_id = self._optional(request, "PAD_ID", self.pad_id, batch)
        width = max(len(t) for t in ids)
        input_ids = np.stack(
            [
                np.pad(np.asarray(t, np.int32), (0, width - len(t)), constant_values=p[0])
                for t, p in zip(ids, pad_id, strict=True)
            ]
        )
        lengths = np.asarray([[len(t)] for t in ids], dtype=np.int32)
        tensors = {
            "INPUT_ID": input_ids,
            "REQUEST_INPUT_LEN": lengths,
            "REQUEST_OUTPUT_LEN": output_len,
            "OUT_END_ID": end_id,
            "OUT_PAD_ID": pad_id,
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])
