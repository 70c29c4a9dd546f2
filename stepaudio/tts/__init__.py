"""Speech out: Step-Audio-TTS-3B prompts, token generation and token-to-wav synthesis."""
