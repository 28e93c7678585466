"""Python side of each torch.ops.mmrec.* operator: a documented wrapper, and
the fake, CUDA and autograd registrations of the schema defined in csrc/ops.cpp."""
