"""Triton Python model `postprocessing`: token ids from tensorrt_llm -> text (compactlm's own, minimal).

Inputs TOKENS_BATCH (INT32 [beams, tokens]) and SEQUENCE_LENGTH (INT32 [beams]); output OUTPUT (STRING [beams]),
each beam's first SEQUENCE_LENGTH tokens decoded. With exclude_input_in_output the tokens are only the new ones
(all of them, or in streaming mode those of the last step). Parameters: tokenizer_dir, skip_special_tokens.
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
        self.skip_special_tokens = _param(config, "skip_special_tokens", "true").lower() == "true"

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _one(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
        tokens = tokens.reshape(-1, tokens.shape[-2], tokens.shape[-1])  # [batch, beams, tokens]
        lengths = lengths.reshape(tokens.shape[0], tokens.shape[1])
        texts = [
            [
                self.tokenizer.decode(beam[:length].tolist(), skip_special_tokens=self.skip_special_tokens).encode()
                for beam, length in zip(beams, beam_lengths, strict=True)
            ]
            for beams, beam_lengths in zip(tokens, lengths, strict=True)
        ]
        output = np.array(texts, dtype=object)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output)])
