"""Triton Python model `tensorrt_llm_bls`: preprocessing -> tensorrt_llm -> postprocessing as one decoupled model
(business-logic scripting; compactlm's own, minimal). With `stream` true each engine step's text is sent as it
comes; otherwise the whole text once. Parameters: tensorrt_llm_model_name, tensorrt_llm_decoupled (whether that
model streams), accumulate_tokens (stream the whole text so far instead of the new piece).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

PRE_OUTPUTS = ["INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN", "OUT_END_ID", "OUT_PAD_ID"]
LLM_INPUTS = {
    "INPUT_ID": "input_ids",
    "REQUEST_INPUT_LEN": "input_lengths",
    "REQUEST_OUTPUT_LEN": "request_output_len",
    "OUT_END_ID": "end_id",
    "OUT_PAD_ID": "pad_id",
}
PASSED = {"temperature": "temperature", "top_k": "runtime_top_k", "top_p": "runtime_top_p"}
PASSED["random_seed"] = "random_seed"


def _param(config: dict, key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def _checked(response, step: str):
    if response.has_error():
        raise RuntimeError(f"{step}: {response.error().message()}")
    return response


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.llm = _param(config, "tensorrt_llm_model_name", "tensorrt_llm")
        self.llm_decoupled = _param(config, "tensorrt_llm_decoupled", "true").lower() == "true"
        self.accumulate = _param(config, "accumulate_tokens", "false").lower() == "true"

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._one(request, sender)
            except Exception as exc:  # the client gets the reason; the other requests go on
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        return None

    def _one(self, request, sender):
        get = pb_utils.get_input_tensor_by_name
        stream_tensor = get(request, "stream")
        stream = bool(stream_tensor.as_numpy().reshape(-1)[0]) if stream_tensor is not None else False
        pre_inputs = [pb_utils.Tensor("QUERY", get(request, "text_input").as_numpy())]
        pre_inputs.append(pb_utils.Tensor("REQUEST_OUTPUT_LEN", get(request, "max_tokens").as_numpy()))
        for name, target in (("end_id", "END_ID"), ("pad_id", "PAD_ID")):
            if get(request, name) is not None:
                pre_inputs.append(pb_utils.Tensor(target, get(request, name).as_numpy()))
        pre = _checked(
            pb_utils.InferenceRequest(
                model_name="preprocessing", inputs=pre_inputs, requested_output_names=PRE_OUTPUTS
            ).exec(),
            "preprocessing",
        )
        llm_inputs = [
            pb_utils.Tensor(LLM_INPUTS[n], pb_utils.get_output_tensor_by_name(pre, n).as_numpy()) for n in PRE_OUTPUTS
        ]
        llm_inputs.append(pb_utils.Tensor("streaming", np.array([[stream and self.llm_decoupled]], dtype=bool)))
        for name, target in PASSED.items():
            if get(request, name) is not None:
                llm_inputs.append(pb_utils.Tensor(target, get(request, name).as_numpy()))
        llm_request = pb_utils.InferenceRequest(
            model_name=self.llm, inputs=llm_inputs, requested_output_names=["output_ids", "sequence_length"]
        )
        responses = llm_request.exec(decoupled=True) if self.llm_decoupled else [llm_request.exec()]
        tokens: list[int] = []
        for response in responses:
            _checked(response, self.llm)
            ids = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if ids is None:  # the empty final response of a decoupled model
                continue
            lengths = pb_utils.get_output_tensor_by_name(response, "sequence_length").as_numpy()
            new = ids.as_numpy().reshape(-1)[: int(lengths.reshape(-1)[0])].tolist()
            tokens += new
            if stream:
                sender.send(self._text(tokens if self.accumulate else new))
        if not stream:
            sender.send(self._text(tokens))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _text(self, tokens: list[int]):
        post = _checked(
            pb_utils.InferenceRequest(
                model_name="postprocessing",
                inputs=[
                    pb_utils.Tensor("TOKENS_BATCH", np.asarray([[tokens]], dtype=np.int32)),
                    pb_utils.Tensor("SEQUENCE_LENGTH", np.asarray([[len(tokens)]], dtype=np.int32)),
                ],
                requested_output_names=["OUTPUT"],
            ).exec(),
            "postprocessing",
        )
        text = pb_utils.get_output_tensor_by_name(post, "OUTPUT").as_numpy().reshape(-1)[:1]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", text.reshape(1, 1))])
