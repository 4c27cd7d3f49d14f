"""The API dialects served over the engines' one (OpenAI chat): Anthropic Messages, Responses."""
