"""A stand-in for the prepared native call the decoder builds per packed layer (kernels.cpu.CpuLinearPlan) that
returns zeros: what is left of a decoding step with it is everything but the packed GEMVs. Shared by
decode_step_gemvs.py and folder_step_parts.py (run from this folder, so it imports as a sibling)."""


class StubPlan:
    def __init__(self, packed, g, h, bias=None, **kw):
        self.out_features = g.shape[-1]

    def __call__(self, x, threads=None):
        return x.new_zeros(*x.shape[:-1], self.out_features)

    def row_fn(self, threads, reuse_output=False):   # the decoder's one-row calls (CpuLinearPlan.row_fn)
        return lambda x: x.new_zeros(1, self.out_features)
