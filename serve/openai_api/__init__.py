"""The OpenAI-compatible front of `compactlm serve`: FastAPI + uvicorn over the shared request layer.

schema.py      the request bodies (pydantic, strict), published as the OpenAPI document
generation.py  the engine requests of one OpenAI request, read on the event loop
responses.py   OpenAI's response and chunk bodies
app.py         the routes, errors in OpenAI's shape, body limits, /metrics
route.py       uvicorn in a background thread
"""
