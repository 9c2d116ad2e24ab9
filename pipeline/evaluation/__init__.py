"""Evaluation: safety and helpfulness judges, replicates, repair of malformed judgements (SPEC §3)."""
