"""Pipeline stages: one thin module per stage exposing `main(cfg)` and a `python -m` CLI."""
