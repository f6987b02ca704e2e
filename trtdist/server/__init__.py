"""The leader's OpenAI-compatible HTTP server and its bridge to the engine thread."""
