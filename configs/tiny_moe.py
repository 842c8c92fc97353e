"""configs/tiny.py with a mixture of experts in every block: 8 SwiGLU experts of width 352,
2 per token, so each token uses as many feed-forward parameters as the dense tiny model
(2 x 352 = its d_ff of 704) out of 4x as many in all.

python train/main.py --config configs/tiny_moe.py
Compare at equal total parameters: configs/tiny.py with --config.model.d_ff=2816.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.workdir = "runs/tiny_moe"
  m = c.model
  m.n_experts = 8
  m.n_experts_per_token = 2
  m.moe_d_ff = 352
  m.router = "mixtral"
  m.router_aux_loss_coef = 0.01  # Switch Transformer's alpha
  m.router_z_loss_coef = 0.001  # ST-MoE's
  return c
