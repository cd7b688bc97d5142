"""Generation: the engines behind one protocol (base.py: in-process torch, vLLM colocated or server) and the vLLM
server command."""
