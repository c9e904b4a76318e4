"""Generated code of the public API (protos/distinfer/v1/inference.proto); regenerate with
`python protos/generate.py`, never edit by hand."""
