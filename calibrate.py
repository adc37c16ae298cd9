"""
calibrate.py -- how a new GDN layer is initialised: the init registry.

Every init takes a freshly hybridised student (gdn.hybridize: W_q, W_k, W_v, W_o copied from the
teacher, gates at the standard random init) and sets its GDN layers in place:

  naive      nothing more: the copy plus random gates (METHOD section 2).
  zero-gate  naive, then W_g = 0: SiLU(0) = 0 closes every output gate, so each GDN branch outputs
             exactly 0 at the start and the hybrid is the teacher with those attention layers
             removed (the residual stream passes through).

Signature shared by every entry of INITS: fn(student, teacher, calib_ids, opts) -> dict of what it
measured (saved in the conversion JSON). calib_ids [N, L] are held-out calibration tokens; opts is a
dict of the init's named options.
"""

import torch

from gdn import gdn_modules


def init_naive(student, teacher, calib_ids, opts):
    return {}


@torch.no_grad()
def init_zero_gate(student, teacher, calib_ids, opts):
    for gdn in gdn_modules(student).values():
        gdn.g_proj.weight.zero_()
    return {}


INITS = {"naive": init_naive, "zero-gate": init_zero_gate}
