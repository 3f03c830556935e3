"""The ONNX front: find fold sites (match, rules/), apply them (passes), load and save (io)."""
