"""Generative model backends shared by the MLLM stages (scoring, capability
scoring, instruction synthesis): one request type, one answer type, two
backends (an OpenAI-compatible HTTP endpoint, an in-process ``transformers``
model) and a request cache so that a resumed run does not ask again."""
