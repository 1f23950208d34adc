"""Pure tensor math of RaBiT: sign/STE, SVID variants, preconditioning."""
from .binarize import binarize, sign_ste, straight_through, ste_mask
from .precondition import importance_weights, precondition_weight, preconditioned_decompose, unprecondition_paths
from .svid import (
    coupled_signs,
    decompose,
    iterative_residual_svid,
    naive_residual_sign,
    path_matrix,
    rank1_nonnegative,
    reconstruct,
    residual_svid,
    svid,
)
