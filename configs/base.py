"""Every config key, with its default and a one-line meaning.

Other configs start from `base.get_config()` and change what they need. Override any
key on the command line: `--config.train.steps=200 --config.model.d_model=512`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"  # Run directory (local, or gs://bucket/run): config.json, checkpoints/, tokenizer.json, metrics.jsonl, tb/.
  c.seed = 0  # Seed for parameter init, dropout-free training RNG and data shuffling.
  c.task = "pretrain"  # What to train: pretrain, sft, reward, dpo, ppo or grpo (train/tasks/).

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 4096  # Embedding rows; must be >= the tokenizer's vocabulary.
  m.d_model = 256  # Residual stream width (D).
  m.n_layers = 4  # Decoder blocks (L).
  m.n_heads = 4  # Query heads (N).
  m.n_kv_heads = 2  # Key/value heads (K); n_heads % n_kv_heads == 0 (grouped-query attention).
  m.head_dim = 0  # Per-head width (H); 0 means d_model // n_heads.
  m.d_ff = 704  # SwiGLU hidden width (F).
  m.max_seq_len = 2048  # Longest sequence the model accepts (RoPE table, KV cache size).
  m.rope_theta = 10000.0  # RoPE base frequency.
  m.rope_scaling_factor = 0.0  # RoPE scaling factor (Llama-3.1: 8, Gemma 3 4B+: 8 on the global layers); 0 disables it.
  m.rope_scaling_type = "llama3"  # How the factor scales: llama3 (Llama 3.1's per-wavelength blend, the keys below) or linear (positions / factor).
  m.rope_low_freq_factor = 1.0  # Llama-3.1 scaling: wavelengths above original_len / low_freq_factor are scaled fully.
  m.rope_high_freq_factor = 4.0  # Llama-3.1 scaling: wavelengths below original_len / high_freq_factor are kept.
  m.rope_original_max_len = 8192  # Llama-3.1 scaling: the context length the model was pretrained with.
  m.norm_eps = 1e-5  # RMSNorm epsilon.
  m.tie_embeddings = True  # Output head reuses the embedding matrix.
  m.param_dtype = "float32"  # Master weights (f32 keeps the optimizer exact).
  m.dtype = "float32"  # Compute dtype: float32 or bfloat16.
  m.scan_layers = True  # lax.scan over layers: one compiled block (per local/global period), params stacked on a "layers" axis.
  m.remat = "none"  # Rematerialisation per block: none, full, dots (save matmul outputs), dots_no_batch.
  m.attention_impl = "auto"  # auto (Pallas where pallas_kernels/paths.py covers the chip and shape, else XLA), xla, or pallas.
  m.init_std = 0.02  # Std of the normal init of weight matrices.
  m.value_head = False  # A scalar head instead of the LM head (reward models); values [B, T].
  # Family options (configs/mistral_7b.py, qwen3_0p6b.py, gemma3_1b.py, ...); the defaults are Llama's.
  m.qkv_bias = False  # Qwen2: a bias on the q, k and v projections.
  m.qk_norm = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE.
  m.mlp_activation = "silu"  # silu (SwiGLU: Llama, Mistral, Qwen) or gelu_tanh (GeGLU: Gemma).
  m.norm_plus_one = False  # Gemma: RMSNorm scales by (1 + w), with w initialised at 0.
  m.post_norms = False  # Gemma 2/3: also RMSNorm the attention and MLP outputs before the residual add.
  m.embed_scale = False  # Gemma: the embeddings are multiplied by sqrt(d_model).
  m.sliding_window = 0  # Local layers attend to the last sliding_window keys (Mistral: 4096); 0: every layer global.
  m.global_every = 0  # With a window, layer i is global iff (i + 1) % global_every == 0 (Gemma 2: 2, Gemma 3: 6); 0: all layers local.
  m.rope_local_theta = 0.0  # The local layers' own RoPE base, never scaled (Gemma 3: 10000); 0: they use the global RoPE, scaling included.
  m.attn_scale = 0.0  # Attention scores scale; 0 means head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5).
  m.attn_softcap = 0.0  # Gemma 2: attention scores s -> c * tanh(s / c); 0: none.
  m.final_softcap = 0.0  # Gemma 2: logits z -> c * tanh(z / c); 0: none.
  m.n_experts = 0  # Mixture-of-experts feed-forward with this many experts (E, model/moe.py); 0 keeps the dense MLP.
  m.n_experts_per_token = 2  # Experts each token is routed to (k).
  m.moe_d_ff = 0  # Each expert's SwiGLU hidden width; 0 means d_ff.
  m.router = "mixtral"  # mixtral (softmax over the top-k logits) or qwen3_moe (top-k of the softmax over all experts).
  m.norm_topk_prob = True  # qwen3_moe router: renormalise the top-k probabilities to sum to 1.
  m.capacity_factor = 0.0  # 0: dropless; else each expert keeps at most ceil(factor * tokens * k / E) assignments.
  m.router_aux_loss_coef = 0.001  # Weight of the load-balancing loss E * sum_i f_i P_i (1 when balanced; HF's form is k times this).
  m.router_z_loss_coef = 0.0  # Weight of the router z-loss mean(logsumexp(router logits)^2); ST-MoE uses 0.001.
  m.moe_impl = "auto"  # gmm (dropless grouped matmul over tokens sorted by expert: megablox on TPU, our Triton kernel on GPU, ragged_dot elsewhere), ragged (XLA's ragged_dot), dense (every expert on every token), auto (dense on CPU up to 16 experts, else gmm).

  c.data = d = ml_collections.ConfigDict()
  d.corpus = "stdlib"  # "stdlib" (the running Python's standard library sources) or a glob of files.
  d.val_corpus = ""  # A glob of validation files; empty holds out val_fraction of the corpus files.
  d.make = ""  # "module:function" writing the data into the corpus's directory when it matches nothing.
  d.format = "text"  # For a glob: text (a file is a document) or jsonl (a line is a document).
  d.text_field = "text"  # JSONL field holding the document text.
  d.val_fraction = 0.02  # Fraction of files held out for validation (chosen deterministically by path).
  d.seq_len = 256  # Tokens per packed training row (T).
  d.tokenizer = ""  # Path to a tokenizer.json to use (its dir's tokenizer_config.json names EOS/BOS); empty trains a byte-level BPE on the train split.
  d.tokenizer_train_mb = 8.0  # Megabytes of training text the BPE tokenizer is learned from.
  d.streams = 0  # Independent data streams, each feeding its own rows of every batch (a host reads only its own); 0: one per row.
  d.shuffle_rows = 512  # Training rows shuffled together, shared out over the streams (a window spanning many files); 0 disables.
  d.worker_count = 0  # grain worker processes, each running whole streams (0 = a thread of the main process).
  # Post-training data (JSONL: SFT rows, preference pairs or prompts; train/posttrain_data.py).
  d.truncation = "keep_end"  # Rows over seq_len: keep_end (drop the prompt's start) or drop.
  d.skip_bad_rows = False  # Skip (and count) malformed rows instead of stopping at the first.
  d.pack = True  # SFT: pack several examples into a row (segment ids keep them apart).

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000  # Optimizer steps.
  t.batch_size = 16  # Global batch size in sequences (split over the data, fsdp and expert mesh axes).
  t.microbatches = 1  # Gradient accumulation: the batch is split into this many microbatches.
  t.lr = 3e-3  # Peak learning rate.
  t.warmup_steps = 50  # Linear warmup steps from 0 to lr.
  t.decay = "cosine"  # Decay after warmup: cosine, linear, constant or wsd (warmup-stable-decay: lr held, then the last decay_fraction of the steps decays linearly).
  t.decay_fraction = 0.2  # wsd: the final fraction of the steps that decays to min_lr.
  t.min_lr_ratio = 0.1  # Final learning rate as a fraction of lr.
  t.optimizer = "adamw"  # "adamw" | "adamw8bit" (Adam's moments in 8 bits, block-wise: ~4x less optimizer memory) | "adafactor" (factored second moments, no momentum) | "lion" (b1, b2 as Lion's) | "muon" (block matrices orthogonalized, momentum b1; the rest AdamW; updates at AdamW's RMS so lr carries over).
  t.optimizer_block = 256  # adamw8bit: elements per quantization block along each tensor's last axis (one f32 absmax each); best a divisor of a shard's length of that axis (else the absmax is replicated).
  t.weight_decay = 0.1  # AdamW decoupled weight decay (not applied to norms and biases).
  t.b1 = 0.9  # Adam beta1.
  t.b2 = 0.95  # Adam beta2.
  t.eps = 1e-8  # Adam epsilon.
  t.grad_clip = 1.0  # Global-norm gradient clipping; 0 disables it.
  t.on_nonfinite = "stop"  # A step whose loss, gradient or update is inf/nan never changes the weights; "stop": the run then stops, saving nothing after it (exit 2); "skip": it goes on and counts skipped_steps.
  t.z_loss = 0.0  # Coefficient of the z-loss (log Z)^2 that keeps logits from drifting.
  t.loss_chunk = 1024  # Tokens per device whose logits the loss holds at once (model/head.py); 0: all.
  t.log_every = 10  # Steps between metric lines.
  t.eval_every = 200  # Steps between validation passes; 0 evaluates only at the end.
  t.eval_batches = 8  # Batches per validation pass.
  t.init_from = ""  # A run directory (e.g. a converted model) whose params start training.

  c.lora = lo = ml_collections.ConfigDict()
  lo.rank = 0  # LoRA rank (Hu et al. 2021); 0 trains every weight. The base is train.init_from's (without one: random, for tests and dry runs).
  lo.alpha = 16.0  # Adapter scale alpha / rank.
  lo.targets = "q,k,v,o,gate,up,down"  # Projections that get adapters.
  lo.base_quant = ""  # QLoRA (Dettmers et al. 2023): nf4 (double-quantized scales), int8 or int4 freezes the base's block matmuls quantized on load; "" keeps them as stored.
  lo.base_quant_group = 64  # lora.base_quant: input elements per scale (QLoRA's block: 64); 0: per output channel.

  c.dpo = dp = ml_collections.ConfigDict()
  dp.beta = 0.1  # Strength of the KL constraint to the reference.
  dp.loss = "sigmoid"  # sigmoid (Rafailov et al. 2023), ipo (Azar et al. 2023) or hinge.
  dp.label_smoothing = 0.0  # sigmoid only: assumed fraction of flipped preference labels.
  dp.reference = ""  # Run directory of the reference; empty: train.init_from (LoRA: the base).
  dp.precompute_reference = False  # Score the reference once up front instead of every step.

  c.rl = rl = ml_collections.ConfigDict()
  rl.reward_fn = ""  # "module:function" (prompt, completion) -> float; or use rl.reward_model.
  rl.reward_model = ""  # Run directory of a reward model (task=reward) scoring completions.
  rl.value_init = ""  # PPO critic's start: a reward-model run; empty: rl.reward_model, else the policy.
  rl.prompts_per_rollout = 16  # Prompts sampled per rollout (times group_size for GRPO).
  rl.group_size = 4  # GRPO: completions per prompt (G).
  rl.max_new_tokens = 64  # Completion length limit in rollouts and evaluation.
  rl.temperature = 1.0  # Rollout sampling temperature (log-probs use the same).
  rl.epochs = 2  # Passes over each rollout batch, in shuffled minibatches of train.batch_size.
  rl.kl_coef = 0.05  # beta: KL penalty to the reference (PPO: in the reward; GRPO: in the loss).
  rl.kl_estimator = "k1"  # PPO's per-token KL: k1 (log ratio) or k3 (GRPO always uses k3).
  rl.kl_target = 0.0  # Adaptive KL controller target (Ziegler et al. 2019); 0 keeps beta fixed.
  rl.kl_horizon = 10000  # Adaptive KL controller horizon, in sequences.
  rl.clip = 0.2  # Policy ratio clip epsilon.
  rl.value_clip = 0.2  # PPO value clip epsilon.
  rl.vf_coef = 0.1  # PPO value loss coefficient.
  rl.gamma = 1.0  # GAE discount.
  rl.lam = 0.95  # GAE lambda.
  rl.no_eos_penalty = 0.0  # Added to the score of a completion that never emitted EOS.
  rl.loss_agg = "grpo"  # GRPO: grpo (token mean per sequence, then mean) or bnpo (token mean).
  rl.eval_prompts = ""  # Glob of prompt JSONL scored with greedy answers at evaluation (needs reward_fn).
  rl.eval_samples = 64  # Prompts scored per evaluation.

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every = 200  # Steps between checkpoints (one is always written at the end).
  ck.keep = 3  # Checkpoints kept.
  ck.async_save = True  # Write checkpoints in the background while training continues.
  ck.preemption_check_every = 10  # Multi-process: steps between checks for SIGINT on any process (and SIGTERM when JAX's preemption service is off); each is a host sync.

  c.mesh = ms = ml_collections.ConfigDict()
  # Mesh axes (data, fsdp, expert, tensor); at most one size may be -1 (it fills the devices left over).
  ms.data = -1  # Data-parallel axis size.
  ms.fsdp = 1  # Fully sharded data parallel axis size (params and optimizer state sharded).
  ms.expert = 1  # Expert-parallel axis size: MoE experts split over it (must divide model.n_experts); it also splits the batch.
  ms.tensor = 1  # Tensor-parallel axis size (heads and MLP sharded).

  c.distributed = ds = ml_collections.ConfigDict()
  ds.coordinator_address = ""  # host:port of process 0; empty uses the environment (or single process).
  ds.num_processes = 0  # Processes in the job; 0 uses the environment.
  ds.process_id = -1  # This process's index; -1 uses the environment.

  c.metrics = mt = ml_collections.ConfigDict()
  mt.peak_tflops = 0.0  # Peak device TFLOP/s for MFU; 0 looks the chip up (train/accelerators.py; CPU: probed once; unknown: no mfu).
  mt.tensorboard = True  # Write TensorBoard events to workdir/tb (metrics, the config as hparams, the end-of-run sample).
  mt.wandb_project = ""  # Weights & Biases project to log to (pip install -e '.[wandb]'); "" logs nowhere. WANDB_MODE=offline needs no account.
  mt.wandb_entity = ""  # W&B team or user; "" is your default.
  mt.wandb_name = ""  # W&B run name; "" is the workdir's name. A resumed workdir continues its W&B run.

  c.profile = pf = ml_collections.ConfigDict()
  pf.start_step = 10  # First traced step, after this many steps (compiling is step 1).
  pf.steps = 0  # Steps traced with jax.profiler into workdir/profile (TensorBoard's profile plugin, XProf); 0 traces nothing.

  c.sample = s = ml_collections.ConfigDict()
  s.prompt = "def "  # Prompt of the sample printed after training.
  s.max_new_tokens = 200  # Tokens sampled after training; 0 skips sampling.
  s.temperature = 0.8  # Sampling temperature (0 is greedy).
  s.top_k = 40  # Keep the k most likely tokens (0 keeps all).
  return c
