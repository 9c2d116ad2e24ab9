"""Emulation: agents acting in an LLM-emulated tool sandbox (SPEC §2), batched across cases, resumable."""
