"""Coverage-guided fuzzing of mbsec's pure parsers (atheris); see fuzz/README.md."""
