"""Data contracts: cases and toolkits, trajectory and evaluation records, run-file names, the case split."""
