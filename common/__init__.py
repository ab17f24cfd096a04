"""muxtune.common: torch-free helpers every package uses (bounded quoting, atomic writes, safe
YAML reading, the command-line runner)."""
