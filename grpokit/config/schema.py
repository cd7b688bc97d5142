"""The run configuration's schema: `GRPOConfig` (every setting, typed, with its default and help) and `RewardEntry`.

Option names follow TRL's `GRPOConfig` wherever TRL has the option. Field constraints and the
cross-field checks (batch geometry, rewards, quantisation) run when a config is built, before any
model is loaded; derived quantities (completions per generation, optimizer steps per generation,
reward names and weights) are properties here. A field marked `json_schema_extra=RESUME_NEUTRAL`
changes what a run logs or keeps, not what it computes: it may differ when a run resumes
(`resume_neutral_keys`, read by the checkpoint's config check).

Loading (layers, `--set`, unknown keys) is loading.py; other tools' keys are compat.py; presets are
presets.py. Importing this package loads no torch.
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from grpokit.rewards.registry import BUILTIN_REWARDS, reward_name
from grpokit.runtime.distributed import world_size

# a field's mark: it changes what a run logs or keeps, not what it computes, so it may differ on resume
RESUME_NEUTRAL: dict[str, Any] = {"resume_neutral": True}
# the metric sinks `report_to` may name (its type lists the same)
REPORT_SINKS = ("tensorboard", "wandb", "mlflow", "trackio")


class RewardEntry(BaseModel):
    """A `reward_funcs` entry with settings: `{func: code_tests, args: {timeout_s: 5}, weight: 1.0}`."""

    model_config = ConfigDict(extra="forbid")
    func: str = Field(description="Built-in name, 'module.function_or_Class', or 'file.py:function_or_Class'.")
    name: str | None = Field(None, description="Name in metrics and errors (default: the built-in or attribute name).")
    args: dict[str, Any] = Field(default_factory=dict, description=(
        "Constructor arguments of a class; fixed keyword arguments of a function."))
    weight: float | None = Field(None, description="This reward's weight (or use reward_weights, not both).")
    cache: bool | None = Field(None, description=(
        "Score identical (prompt, completion, row) once (default: on for expensive built-ins)."))
    isolation: Literal["process", "inline"] | None = Field(None, description=(
        "'process': a killable worker with reward_timeout (default); 'inline': in the trainer process, no timeout."))


class GRPOConfig(BaseModel):
    """Every setting of a run, with its default and help; built once per run and checked as a whole."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # fields given as 'auto' and settled by `settle_auto` -> what it chose and why (replaced, never mutated: copies
    # of a config share their private attributes)
    _from_auto: dict[str, str] = PrivateAttr(default_factory=dict)

    # model and data
    model: str = Field("smollm2-135m-instruct", description=(
        "Hub id, local HF directory, or 'smollm2-135m-instruct' (embedded, no download)."))
    dataset: str = Field("arithmetic", description=(
        "Train data: a built-in ('arithmetic[?key=value&...]', 'gsm8k', 'humaneval', "
        "'reasoning_gym:<task>?size=N&...'), a .jsonl/.json/.csv/.parquet file, a save_to_disk directory "
        "('dir[:split]'), or a hub id when online."))
    eval_dataset: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "Held-out data, same forms as `dataset`; 'arithmetic:held_out' and 'gsm8k:held_out' are the built-ins' fixed "
        "held-out splits."))
    validation_dataset: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "Data for choosing the best model, same forms as `dataset` ('arithmetic:validation', "
        "'reasoning_gym:<task>:validation?...'; its prompts that are also train or held-out prompts are left out). "
        "Evaluated beside eval_dataset at every evaluation, logged as validation/*; with it, metric_for_best_model "
        "ranks by the validation result, so the held-out score reported for the chosen model is not selected on."))
    eval_limit: int | None = Field(None, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Evaluate on at most this many held-out prompts."))
    torch_dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field("float32", description=(
        "dtype the policy's weights are loaded and trained in (bf16: see also `bf16` for autocast with fp32 weights)."))
    use_peft: bool = Field(False, description=(
        "Train LoRA adapters (peft) instead of all weights; the reference policy is then the same model with adapters "
        "disabled."))
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    lora_target_modules: list[str] | str = Field("all-linear", description=(
        "Modules that get adapters: names, or 'all-linear'."))
    load_in_4bit: bool | Literal["auto"] = Field(False, description=(
        "QLoRA: load the policy's linear weights in 4 bits (bitsandbytes, extra `qlora`, a CUDA GPU) and train LoRA "
        "adapters on them (needs use_peft); compute dtype bfloat16 under bf16 or torch_dtype bfloat16, float16 for "
        "torch_dtype float16, else float32. 'auto' (the math-QA presets): on where it can run (use_peft, a CUDA GPU, "
        "bitsandbytes installed), else off with a one-line note; the run records which."))
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description=(
        "With load_in_4bit: the 4-bit data type, nf4 (NormalFloat, the QLoRA paper's) or fp4."))
    bnb_4bit_use_double_quant: bool = Field(True, description=(
        "With load_in_4bit: quantise the quantisation constants too (~0.4 bit per weight saved; the QLoRA paper's and "
        "Axolotl's default; TRL's use_bnb_nested_quant, default false there)."))
    prompt_column: str = Field("prompt", description="Column holding the prompt: a string, or a list of chat messages.")
    system_prompt: str | None = Field(None, description=(
        "System message prepended to conversational prompts that have none."))
    prompt_template: str | None = Field(None, description=(
        "Build each prompt from the row's columns: a format string ('Solve: {question}') or a Jinja template "
        "(contains '{{'); the text becomes the user message."))
    transform: str | None = Field(None, description=(
        "Per-row function 'module.fn' or 'file.py:fn', called as fn(example, tokenizer=None) -> dict, after "
        "column_mapping and before prompt_template."))
    column_mapping: dict[str, str] | None = Field(None, description=(
        "Rename dataset columns first: {their_name: our_name}, e.g. {instruction: prompt}."))
    max_prompt_length: int | None = Field(512, gt=0, description=(
        "Prompts longer than this many tokens are dropped (counted and logged)."))
    sft_target_column: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "`grpokit sft`: the column holding each prompt's target answer (default: 'completion', else 'answer', else "
        "'solution'); rows with a 'messages' column train on its assistant turns instead."))
    output_dir: str = Field("outputs/grpo", json_schema_extra=RESUME_NEUTRAL, description=(
        "Run directory: config.yaml, metrics.jsonl, final_model/."))

    # rewards
    reward_funcs: list[str | RewardEntry] = Field(
        default_factory=lambda: ["number_correct", "answer_format"], min_length=1, description=(
            "Reward functions: built-in names, dotted paths ('pkg.module.fn'), 'file.py:fn', or "
            "{func:, name:, args:, weight:} entries."))
    reward_weights: list[float] | None = Field(None, description="One weight per reward function (default: all 1.0).")
    reward_combination: Literal["weighted_sum", "normalize_then_sum", "gated"] = Field("weighted_sum", description=(
        "weighted_sum: sum the weighted rewards, then normalise in the group; normalize_then_sum: z-score each reward "
        "in its group first (GDPO; TRL's multi_objective_aggregation); gated: like weighted_sum, but the other "
        "rewards count only where reward_gate passes."))
    reward_gate: str | None = Field(None, description=(
        "With reward_combination=gated: the reward that must pass (>= reward_gate_threshold) for the others to count, "
        "e.g. a format check in front of correctness."))
    reward_gate_threshold: float = Field(1.0, description="The gate passes where its reward is >= this.")
    reward_timeout: float | None = Field(60.0, gt=0.0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Seconds one reward call may take (per completion for per-sample functions) before its worker is killed and "
        "the result counts as missing; None: no limit."))
    reward_error_rate_limit: float = Field(0.1, ge=0.0, le=1.0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Stop the run when a reward function fails (raises, times out, returns inf) on more than this fraction of the "
        "completions it scored."))
    eval_accuracy_reward: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "Reward whose mean is reported as eval/accuracy (default: the first)."))

    # GRPO
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G).")
    max_completion_length: int = Field(256, gt=0, description="Most tokens generated per completion.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature for training rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description=(
        "Min-p sampling: keep tokens with probability >= min_p x the top token's (0: off)."))
    repetition_penalty: float = Field(1.0, gt=0.0, description=(
        "transformers' repetition penalty over prompt and completion tokens while sampling (1: off); the loss still "
        "scores the unpenalised policy, as in TRL."))
    stop_strings: list[str] = Field(default_factory=list, description=(
        "Completions end at the first of these strings (kept in the completion, finish reason 'stop'); also in "
        "evaluation."))
    beta: float = Field(0.0, ge=0.0, description=(
        "KL coefficient to the reference policy (k3 estimator); 0 loads no reference."))
    epsilon: float = Field(0.2, gt=0.0, description=(
        "Lower clip range of the importance ratio (and upper, unless epsilon_high)."))
    epsilon_high: float | None = Field(None, gt=0.0, description=(
        "Upper clip range (DAPO clip-higher); default: epsilon."))
    delta: float | None = Field(None, gt=1.0, description=(
        "Two-sided clipping: cap on the unclipped importance ratio (INTELLECT-2); None: no cap."))
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description=(
        "Importance ratio per token (GRPO) or one per completion from its mean log-ratio (GSPO)."))
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description=(
        "Loss normalisation: grpo (per-sequence mean), bnpo/dapo (per token over the batch), dr_grpo (by batch x "
        "max_completion_length)."))
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description=(
        "Divide advantages by the reward std of the group, of the batch, or not at all."))
    failed_group_advantage: float = Field(0.0, ge=0.0, le=10.0, description=(
        "Advantage -x for every completion of a group in which all completions got a total reward <= 0 (all wrong): "
        "pushes the policy off confidently wrong answers, where group-relative advantages give no signal. 0: off."))
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each generation (mu in the paper).")
    steps_per_generation: int | None = Field(None, gt=0, description=(
        "Micro-batches each generation fills (default: gradient_accumulation_steps); more gives several optimizer "
        "steps per generation."))
    mask_truncated_completions: bool = Field(False, description=(
        "Leave completions cut off at max_completion_length out of the loss (DAPO)."))
    top_entropy_quantile: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Train only on this top fraction of tokens by entropy (per micro-batch); 1.0: all tokens."))
    dynamic_sampling: bool = Field(False, description=(
        "DAPO dynamic sampling: drop groups whose rewards have zero spread and refill from fresh prompts."))
    max_resample_rounds: int = Field(3, ge=0, description=(
        "With dynamic_sampling: at most this many refill rounds per generation; then zero-spread groups fill the rest "
        "(and a warning says so)."))
    dynamic_sampling_oversample: float = Field(1.0, ge=1.0, le=16.0, description=(
        "With dynamic_sampling: the first draw samples ceil(this x prompts_per_generation) prompts in one generation "
        "(verl's gen_batch_size over train_batch_size), the groups with reward spread fill the batch in data order "
        "and the rest are dropped; refill rounds follow only if it still falls short. One larger batched generation "
        "costs less than refill rounds one after another; 1.0: draw only what the batch needs."))

    # optimisation
    learning_rate: float = Field(1e-6, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field("constant", description=(
        "Learning-rate schedule after warmup."))
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Completions per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, description=(
        "Micro-batches per optimizer step; one generation fills them all."))
    max_steps: int = Field(100, gt=0, description="Optimizer steps to run.")
    max_train_seconds: float | None = Field(None, gt=0.0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Wall-clock budget: stop at the end of the first optimizer step after this many seconds of training (the "
        "steps' own time: generation, rewards, update; evaluations and checkpoint writes do not count; a resumed "
        "run goes on counting from its checkpoint's). The run ends as at max_steps: evaluation, final_model, and a "
        "checkpoint when save_steps is set, so --resume with a larger budget or without one goes on. None: no "
        "budget, max_steps alone."))
    num_train_epochs: float | None = Field(None, gt=0.0, description=(
        "Passes over the train prompts instead of max_steps: max_steps = ceil(epochs x ceil(prompts / "
        "prompts_per_generation)) x optimizer steps per generation, computed once the data is loaded."))
    bf16: bool | Literal["auto"] = Field("auto", description=(
        "bf16 autocast for generation and the update (fp32 master weights and optimizer state); fast on CPUs with "
        "avx512_bf16/AMX and on recent GPUs. On such CPUs Llama-family models (Llama, Mistral, Qwen2, Qwen3) generate "
        "on a bf16 path with weights cast and packed once per generation (benchmarks/RESULTS.md). auto: on where the "
        "run's device computes bf16 natively (a CUDA GPU of compute capability 8.0+, an x86 CPU with avx512_bf16 or "
        "AMX) and the weights are float32, else off; settled when the run starts (its config.yaml records true or "
        "false), and a resumed run keeps its checkpoint's choice."))
    cpu_linear: Literal["auto", "onednn", "torch"] = Field("auto", description=(
        "Kernel for float32 linear layers on CPU (generation and training): onednn (about 2x MKL on AMD CPUs, where "
        "MKL lacks AVX-512), torch (torch's own, MKL), or auto: onednn on AMD CPUs for layers of at least 16,384 "
        "weights; elsewhere torch's, with the sampler's products of those layers on MKL's packed GEMM (weights "
        "packed once per generation, fused per layer on Llama-family models; float32 decode steps 18-27% faster on "
        "a 2-core Xeon). Same float32 math; "
        "results differ in rounding only."))
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute decoder activations in backward instead of storing them (less memory, ~30% more time)."))
    logprob_chunk_size: int = Field(128, gt=0, description=(
        "Tokens per chunk when computing log-probs, so [B, T, V] logits are never materialised."))
    share_prompt_forward: bool = Field(True, description=(
        "Run each distinct prompt of a micro-batch once when computing log-probs and reuse its KV cache for the "
        "group's completions (same result, less compute and memory; off with gradient checkpointing)."))
    seed: int = Field(42, description="Seed for data order, sampling and initialisation.")
    device: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "'cpu', 'cuda', 'cuda:1', ... (default: cuda when available)."))

    # generation engine (vLLM: the engine itself is not in this build yet; the fields hold Axolotl/TRL settings)
    use_vllm: bool = Field(False, description=(
        "Generate with vLLM (extra `vllm`) instead of the in-process sampler; weights are synced and verified before "
        "each generation."))
    vllm_mode: Literal["server", "colocate"] = Field("server", description=(
        "vLLM on its own GPUs behind `grpokit vllm-serve` (server) or inside the trainer process (colocate)."))
    vllm_host: str = Field("127.0.0.1", json_schema_extra=RESUME_NEUTRAL, description=(
        "Host of the `grpokit vllm-serve` server (server mode)."))
    vllm_port: int = Field(8000, gt=0, lt=65536, json_schema_extra=RESUME_NEUTRAL, description=(
        "Port of the vLLM server (server mode)."))
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Fraction of GPU memory vLLM may take."))
    vllm_tensor_parallel_size: int = Field(1, gt=0, description="GPUs one vLLM model is split across.")
    vllm_max_model_len: int | None = Field(None, gt=0, description=(
        "vLLM context length (prompt + completion tokens); default: the model's."))
    vllm_enable_sleep_mode: bool = Field(False, json_schema_extra=RESUME_NEUTRAL, description=(
        "Colocate mode: vLLM releases its GPU memory between generations (sleep / wake_up)."))
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(None, description=(
        "Colocate mode: vLLM's weights dtype (default: torch_dtype); a server takes `grpokit vllm-serve --dtype`."))
    vllm_enable_prefix_caching: bool | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "Colocate mode: vLLM's prefix caching of prompt KV blocks (default: vLLM's, on); a server takes "
        "`grpokit vllm-serve --enable-prefix-caching / --no-enable-prefix-caching`."))

    # evaluation and logging
    eval_on_start: bool = Field(False, json_schema_extra=RESUME_NEUTRAL, description="Evaluate before the first step.")
    eval_steps: int | None = Field(None, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Evaluate every this many steps (and always at the end when eval_dataset is set)."))
    eval_max_completion_length: int | None = Field(None, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Token limit for evaluation (default: max_completion_length)."))
    eval_num_samples: int = Field(0, ge=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Besides the greedy completion, sample this many completions per held-out prompt (the training sampling "
        "settings) for eval/pass@k and eval/maj@k; 0: greedy only."))
    eval_pass_k: list[int] = Field([1], json_schema_extra=RESUME_NEUTRAL, description=(
        "The k of eval/pass@k and eval/maj@k (each at most eval_num_samples)."))
    metric_for_best_model: str | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "An eval metric ('accuracy', 'pass@4', 'rewards/NAME/mean'): after each evaluation the model is saved to "
        "OUTPUT_DIR/best_model/ when this metric is the best so far. A bare name is read from the validation "
        "evaluation when validation_dataset is set, else from the held-out one; 'eval/NAME' or 'validation/NAME' "
        "names the split."))
    greater_is_better: bool | None = Field(None, json_schema_extra=RESUME_NEUTRAL, description=(
        "Whether a larger metric_for_best_model is better (default: true, false for names ending in 'loss' or "
        "'length')."))
    logging_steps: int = Field(1, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Print metrics to the console every this many steps (metrics.jsonl gets every step)."))
    log_completions_steps: int | None = Field(None, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Every this many steps, write the generation's completions with their rewards to "
        "OUTPUT_DIR/completions/step_N.jsonl and print one (training-wizard's sample_rate); None: never."))
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] | Literal["auto", "all", "none"] = Field(
        "auto", json_schema_extra=RESUME_NEUTRAL, description=(
            "Metric sinks besides the console and metrics.jsonl (always written): a list of tensorboard, wandb, "
            "mlflow, trackio; 'auto': tensorboard when installed; 'all': every installed one; 'none'."))

    # checkpoints and faults
    save_steps: int | None = Field(500, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Write OUTPUT_DIR/checkpoint-N every this many optimizer steps (weights, optimizer, scheduler, RNG, data "
        "position); None: only final_model."))
    save_total_limit: int | None = Field(3, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Keep only the newest this many checkpoint-N directories (each holds the optimizer state: ~3x the weights); "
        "None: keep all."))
    on_collapse: Literal["warn", "adapt", "stop"] = Field("warn", json_schema_extra=RESUME_NEUTRAL, description=(
        "What a collapse alert of the health monitor (entropy_collapse, identical_completions: the policy samples "
        "one answer, so groups carry no more signal) does: warn (the alert on the console, in the log and "
        "alerts.jsonl), adapt (also raise the sampling temperature by adapt_temperature_step, up to "
        "adapt_max_temperature, for the rest of the run; again each window of steps (10) the collapse still "
        "holds after a raise; each generation's log-probs use the temperature it was sampled at, the "
        "`temperature` metric says which), or stop (also end "
        "the run after that step as at max_steps: evaluation, final_model, and a checkpoint when save_steps is "
        "set)."))
    adapt_temperature_step: float = Field(0.1, gt=0.0, description=(
        "on_collapse adapt: how much each collapse alert raises the sampling temperature."))
    adapt_max_temperature: float = Field(1.2, gt=0.0, description=(
        "on_collapse adapt: the highest temperature it raises to."))
    max_consecutive_skips: int = Field(3, gt=0, json_schema_extra=RESUME_NEUTRAL, description=(
        "Optimizer steps skipped in a row for a non-finite loss or gradient before the run stops with an error."))

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_sink(cls, value):
        if not isinstance(value, str) or value in ("auto", "all", "none"):
            return value
        if value not in REPORT_SINKS:  # said here: as a list it would be reported as `report_to.0`
            close = difflib.get_close_matches(value, REPORT_SINKS + ("auto", "all", "none"), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown sink; {hint}Give one of {', '.join(REPORT_SINKS)}, a list of them, or "
                             "auto, all, none")
        return [value]

    @property
    def micro_batches_per_generation(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def generation_batch_size(self) -> int:
        """Completions per generation, over all processes (WORLD_SIZE under accelerate launch / torchrun)."""
        return self.per_device_train_batch_size * self.micro_batches_per_generation * world_size()

    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations

    @property
    def optimizer_steps_per_generation(self) -> int:
        return self.num_iterations * self.micro_batches_per_generation // self.gradient_accumulation_steps

    @property
    def policy_moves(self) -> bool:
        """The policy takes an optimizer step before some micro-batch of a generation is trained on (several
        passes, or several steps per pass): that generation then needs its old log-probs stored."""
        return self.num_iterations > 1 or self.micro_batches_per_generation > self.gradient_accumulation_steps

    def sampling(self) -> dict[str, Any]:
        """The rollout sampling settings, as SamplingParams keyword arguments."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "stop": list(self.stop_strings)}

    def steps_for_epochs(self, num_prompts: int) -> int:
        """max_steps for `num_train_epochs` passes over `num_prompts` train prompts (rounded up to whole
        generations)."""
        generations = math.ceil(self.num_train_epochs * math.ceil(num_prompts / self.prompts_per_generation))
        return max(1, generations * self.optimizer_steps_per_generation)

    @model_validator(mode="after")
    def _check_geometry(self, info: ValidationInfo) -> GRPOConfig:
        # validated for `grpokit sft` (context {"command": "sft"}): no generations, so none of GRPO's batch rules
        sft = (info.context or {}).get("command") == "sft"
        if self.num_train_epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError("both max_steps and num_train_epochs are set; give one")
        gbs = self.generation_batch_size
        if not sft and self.micro_batches_per_generation % self.gradient_accumulation_steps:
            raise ValueError(f"steps_per_generation = {self.steps_per_generation} must be a multiple of "
                             f"gradient_accumulation_steps = {self.gradient_accumulation_steps}")
        if not sft and gbs % self.num_generations:
            valid = [g for g in range(2, gbs + 1) if gbs % g == 0]
            processes = f" x {world_size()} processes" if world_size() > 1 else ""
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation (default gradient_accumulation_steps)"
                f"{processes} = {gbs} "
                f"completions per generation is not divisible by num_generations = {self.num_generations}; with this "
                f"batch, num_generations can be {valid}, or make the batch a multiple of {self.num_generations}")
        if not sft and self.dynamic_sampling_oversample > 1.0 and not self.dynamic_sampling:
            raise ValueError(f"dynamic_sampling_oversample = {self.dynamic_sampling_oversample} has no effect without "
                             "dynamic_sampling; set dynamic_sampling: true, or drop dynamic_sampling_oversample")
        if not sft and self.on_collapse == "adapt" and self.adapt_max_temperature <= self.temperature:
            raise ValueError(f"on_collapse adapt: adapt_max_temperature = {self.adapt_max_temperature} is not above "
                             f"temperature = {self.temperature}, so there is nothing to raise it to; set "
                             "adapt_max_temperature higher, or on_collapse: warn")
        if any(k < 1 for k in self.eval_pass_k):
            raise ValueError(f"eval_pass_k: each k must be >= 1 (got {self.eval_pass_k})")
        if self.eval_num_samples and max(self.eval_pass_k) > self.eval_num_samples:
            raise ValueError(f"eval_pass_k {self.eval_pass_k} asks for k > eval_num_samples = {self.eval_num_samples}; "
                             f"sample at least {max(self.eval_pass_k)} completions per prompt or lower k")
        self._check_rewards()
        if self.load_in_4bit == "auto":  # settled once: the validated config (and config.yaml) holds true or false
            self.__dict__["load_in_4bit"] = self._four_bit_here(sft)
        self._check_quantization()
        return self

    def _four_bit_here(self, sft: bool = False) -> bool:
        """`load_in_4bit: auto`: whether QLoRA can run with these settings on this machine (a note when not)."""
        import importlib.util
        import logging

        why = None
        if sft:
            why = "`grpokit sft` trains and merges full-precision weights (GRPO after it can load them in 4 bits)"
        elif not self.use_peft:
            why = "use_peft is false (4-bit weights train only through LoRA adapters)"
        elif self.use_vllm or self.torch_dtype == "float64" or (self.device or "cuda").split(":")[0] != "cuda":
            why = "use_vllm, torch_dtype float64 or a non-CUDA device is set"
        elif importlib.util.find_spec("bitsandbytes") is None:
            why = "bitsandbytes is not installed (pip install 'grpokit[qlora]')"
        else:
            from grpokit.runtime import cuda_available

            if not cuda_available():
                why = "no CUDA GPU is available"
        if why is not None:
            logging.getLogger("grpokit.config").info("load_in_4bit: auto -> off: %s; the weights load in full "
                                                     "precision", why)
        return why is None

    def _bf16_here(self) -> tuple[bool, str]:
        """`bf16: auto`: whether this run's device computes bf16 natively and the weights are float32 (autocast's
        master weights), and the note that says so."""
        from grpokit.runtime import bf16_unsupported

        why = (f"torch_dtype is {self.torch_dtype}, not float32" if self.torch_dtype != "float32"
               else bf16_unsupported(self.device))
        if why is None:
            return True, "bf16: auto -> on: the device computes bf16 natively (autocast; float32 master weights)"
        return False, f"bf16: auto -> off: {why}; the run computes in {self.torch_dtype}"

    def settle_auto(self, *, cuda: bool = True) -> GRPOConfig:
        """Settle `bf16: auto` for this machine, in place (config.yaml then records true or false, and a config
        rebuilt from `model_dump(exclude_unset=True)` keeps the value); returns self. The answer needs torch (is
        there a GPU, does it compute bf16), which loading a config never imports, so the commands that compute call
        this first: `early_checks` (train, --dry-run, check), sft, eval/filter/generate, plan, and the 4-bit
        loading arguments.

        `cuda` False leaves a run on a CUDA GPU unsettled: asking the GPU starts CUDA in this process, after which
        the trainer's reward workers could not use CUDA in their fork (the trainer settles it after they start)."""
        if self.bf16 == "auto" and (cuda or not self._on_cuda()):
            import logging

            value, note = self._bf16_here()
            logging.getLogger("grpokit.config").info("%s", note)
            self.__dict__["bf16"] = value  # not setattr: validate_assignment would re-run the GRPO-only checks
            self.__pydantic_fields_set__.add("bf16")
            self._from_auto = {**self._from_auto, "bf16": note}
        return self

    def take_settled(self, other: GRPOConfig) -> GRPOConfig:
        """This config's fields still 'auto' take what `other` (the same settings, settled) settled them to, with
        its notes; returns self."""
        for key, note in other.settled_from_auto.items():
            if getattr(self, key) == "auto":
                self.__dict__[key] = getattr(other, key)
                self.__pydantic_fields_set__.add(key)
                self._from_auto = {**self._from_auto, key: note}
        return self

    def _on_cuda(self) -> bool:
        """Whether the run computes on a CUDA GPU (its device, or none named and torch sees a GPU)."""
        from grpokit.runtime import run_device

        return run_device(self.device).startswith("cuda")

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dict__ and name in self._from_auto:  # set by hand after it was settled: no longer auto's
            self._from_auto = {key: note for key, note in self._from_auto.items() if key != name}

    @property
    def settled_from_auto(self) -> dict[str, str]:
        """The fields this config was given as 'auto' and `settle_auto` settled for this machine, each with its
        note (a resumed run takes its checkpoint's values for them instead: `keep_settled`)."""
        return dict(self._from_auto)

    def keep_settled(self, saved: dict[str, Any], where: str) -> list[str]:
        """Give the fields given as 'auto' (settled or not yet) the values of `saved` (a checkpoint's config, from
        `where`), so that a resumed run computes as it began on whatever machine it resumes; returns what changed,
        said."""
        said = []
        for key in sorted({*self._from_auto, *(k for k in ("bf16",) if getattr(self, k) == "auto")}):
            value, current = saved.get(key), getattr(self, key)
            if not isinstance(value, bool) or value == current:
                continue
            said.append(f"{key}: auto -> {'on' if value else 'off'}, as the run in {where} settled it"
                        + ("" if current == "auto" else f"; this machine would settle {'on' if current else 'off'}"))
            self.__dict__[key] = value  # bool either way: nothing else to check
            self.__pydantic_fields_set__.add(key)
            self._from_auto = {**self._from_auto, key: said[-1]}
        return said

    def _check_quantization(self) -> None:
        if not self.load_in_4bit:
            return
        if not self.use_peft:
            raise ValueError("load_in_4bit: 4-bit weights cannot be trained directly; QLoRA trains LoRA adapters on "
                             "the frozen 4-bit base. Set use_peft: true (Axolotl: adapter: qlora), or drop "
                             "load_in_4bit to train all weights")
        if self.torch_dtype == "float64":
            raise ValueError("load_in_4bit: bitsandbytes computes in bfloat16, float16 or float32, not float64; set "
                             "torch_dtype: bfloat16 (or float32)")
        if self.use_vllm:
            raise ValueError("load_in_4bit with use_vllm: the weight sync sends the policy's weights unquantised and "
                             "cannot send 4-bit ones yet; set use_vllm: false (the in-process sampler generates with "
                             "the 4-bit model)")
        if self.device is not None and not self.device.startswith("cuda"):
            raise ValueError(f"load_in_4bit: bitsandbytes' 4-bit weights need a CUDA device, but device is "
                             f"'{self.device}'; set device: cuda (or leave it unset), or drop load_in_4bit")

    def _check_rewards(self) -> None:
        for i, entry in enumerate(self.reward_funcs):
            func = entry if isinstance(entry, str) else entry.func
            if "." not in func and ":" not in func and func not in BUILTIN_REWARDS:
                close = difflib.get_close_matches(func, BUILTIN_REWARDS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"reward_funcs[{i}]: unknown reward '{func}'{hint} Built-ins: "
                                 f"{sorted(BUILTIN_REWARDS)}; or give 'module.function' or 'file.py:function'")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values but reward_funcs has "
                             f"{len(self.reward_funcs)} functions; give one weight per function")
        if self.reward_weights is not None and any(not isinstance(e, str) and e.weight is not None
                                                   for e in self.reward_funcs):
            raise ValueError("weights are given both in reward_weights and in reward_funcs entries; use one place")
        names = self.reward_names
        if self.eval_accuracy_reward is not None and self.eval_accuracy_reward not in names:
            raise ValueError(f"eval_accuracy_reward '{self.eval_accuracy_reward}' is not one of the rewards {names}")
        if self.reward_combination == "gated":
            if self.reward_gate not in names:
                raise ValueError(f"reward_combination 'gated' needs reward_gate: one of the rewards {names} "
                                 f"(got {self.reward_gate!r})")
            if len(names) < 2:
                raise ValueError("reward_combination 'gated' needs a gate and at least one other reward")
        elif self.reward_gate is not None:
            raise ValueError(f"reward_gate is set but reward_combination is '{self.reward_combination}'; "
                             "set reward_combination: gated")

    @property
    def reward_names(self) -> list[str]:
        return [reward_name(e) for e in self.reward_funcs]

    @property
    def weights(self) -> list[float]:
        """One weight per reward: reward_weights, else each entry's weight (default 1.0)."""
        if self.reward_weights is not None:
            return list(self.reward_weights)
        return [1.0 if isinstance(e, str) or e.weight is None else e.weight for e in self.reward_funcs]

    def to_yaml(self) -> str:
        # with num_train_epochs, max_steps is not yet known (it needs the data): leave it out so the file reloads
        exclude = {"max_steps"} if self.num_train_epochs is not None else None
        return yaml.safe_dump(self.model_dump(mode="json", exclude=exclude), sort_keys=False)


@functools.cache
def resume_neutral_keys() -> frozenset[str]:
    """The fields marked RESUME_NEUTRAL: they may differ between a checkpoint's config and the resumed run's."""
    return frozenset(name for name, field in GRPOConfig.model_fields.items()
                     if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("resume_neutral"))
