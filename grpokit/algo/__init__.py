"""The maths of GRPO: advantages, the loss family, micro-batch records and planning. Imports only torch."""
