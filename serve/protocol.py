"""The wire protocol of `compactlm serve`: Triton model and tensor names, shared by the server and bench's clients.

Two Triton models serve one engine:

`compactlm` (decoupled, streaming; `batching=False` at Triton: the engine batches in flight up to its
max_batch_size). Inputs: `input_ids` INT32 [prompt length] or `text_input` BYTES [1] (one of them),
`max_tokens` INT32 [1], `ignore_eos` BOOL [1] (optional, default false). Each streamed response carries the new
tokens as `output_ids` INT32 [n] and their text as `text_output` BYTES [1] (when the engine has a tokenizer).
gRPC clients ask for the empty final response (`enable_empty_final_response=True`): its `triton_final_response`
parameter ends a request. Over HTTP, POST /v2/models/compactlm/generate_stream with the inputs as JSON
(`{"input_ids": [...], "max_tokens": n, "ignore_eos": true}`): one SSE event per response, the end of the stream
ends the request, an error arrives as `{"error": "..."}`.

`compactlm_full` (not decoupled; Triton's dynamic batcher groups up to the engine's max_batch_size requests):
the same inputs, the whole completion in one response: `output_ids`, `text_output`, `finish_reason` BYTES [1]
("length" or "stop") and `error` BYTES [1] (empty unless this request was refused while batched with others).
"""

TRITON_MODEL = "compactlm"
TRITON_FULL_MODEL = "compactlm_full"
TRITON_INPUT_IDS = "input_ids"
TRITON_TEXT_INPUT = "text_input"
TRITON_MAX_TOKENS = "max_tokens"
TRITON_IGNORE_EOS = "ignore_eos"
TRITON_OUTPUT_IDS = "output_ids"
TRITON_TEXT_OUTPUT = "text_output"
TRITON_FINISH_REASON = "finish_reason"
TRITON_ERROR = "error"
TRITON_FINAL = "triton_final_response"
"""The response parameter that marks the end of a gRPC stream (asked with enable_empty_final_response=True)."""
