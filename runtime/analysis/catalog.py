"""Built-in descriptions for the speed estimator: big MoE models (their public config.json
values, no weights), machines (memory tiers with sizes and sustained bandwidths) and the
bits per weight of common quantization formats.

Owns only data; ``model_size.load_model_spec``, ``model_size.parse_bpw`` and
``machines.load_machine`` (in ``golem.runtime.analysis``) parse it. A machine entry has the same
shape as the JSON file a user writes for their own machine (see ``machines.load_machine``).
"""

from __future__ import annotations

# Hugging Face config.json values (the fields the estimator reads). Multi-token-prediction
# layers (num_nextn_predict_layers) are not run while decoding and are left out.
MODELS: dict[str, dict] = {
    "glm-5": {
        "model_type": "glm_moe_dsa", "hidden_size": 6144, "num_hidden_layers": 78,
        "first_k_dense_replace": 3, "intermediate_size": 12288, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "num_attention_heads": 64, "q_lora_rank": 2048, "kv_lora_rank": 512,
        "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
        "index_n_heads": 32, "index_head_dim": 128, "vocab_size": 154880,
        "tie_word_embeddings": False,
    },
    "glm-4.6": {
        "model_type": "glm4_moe", "hidden_size": 5120, "num_hidden_layers": 92,
        "first_k_dense_replace": 3, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151552, "tie_word_embeddings": False,
    },
    "deepseek-v3": {
        "model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "vocab_size": 129280, "tie_word_embeddings": False,
    },
    "qwen3-235b-a22b": {
        "model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94,
        "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
        "num_experts_per_tok": 8, "num_attention_heads": 64, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "tie_word_embeddings": False,
    },
    "minimax-m2": {
        "model_type": "minimax", "hidden_size": 3072, "num_hidden_layers": 62,
        "intermediate_size": 1536, "num_local_experts": 256, "num_experts_per_tok": 8,
        "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 200064, "tie_word_embeddings": False,
    },
    "olmoe-1b-7b": {
        "model_type": "olmoe", "hidden_size": 2048, "num_hidden_layers": 16,
        "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
        "tie_word_embeddings": False,
    },
}

# Published parameter counts (billions), to check the parameter arithmetic against.
PUBLISHED_PARAMS_B = {
    "glm-5": 744, "glm-4.6": 355, "deepseek-v3": 671, "qwen3-235b-a22b": 235,
    "qwen3-30b-a3b": 30.5, "minimax-m2": 230, "olmoe-1b-7b": 6.9,
}

# Bits per weight, scales included. GGUF block formats: (bits x 256 + scale bits) / 256.
# MLX affine quantization with group size 64 stores a float16 scale and bias per group.
QUANT_BPW: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0,
    "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_K_M": 5.5, "Q4_K": 4.5, "Q4_K_M": 4.5,
    "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K": 3.4375, "IQ3_S": 3.4375,
    "IQ3_XXS": 3.0625, "Q2_K": 2.625, "IQ2_S": 2.5, "IQ2_XS": 2.3125, "IQ2_XXS": 2.0625,
    "IQ1_M": 1.75, "IQ1_S": 1.5625, "MXFP4": 4.25,
    "MLX8": 8.5, "MLX6": 6.5, "MLX4": 4.5, "MLX3": 3.5, "MLX2": 2.5,
}

# Machines: tiers from fastest to slowest. "gb_per_s" is the sustained read bandwidth the
# decoder gets from that tier (10^9 bytes/s), an assumption stated per profile as a fraction
# of the theoretical peak (channels x MT/s x 8 bytes; GPU data sheets); for SSDs it is the
# sequential rate of large (MiB-sized) reads. "reserve" is what the tier cannot give to
# weights (OS, KV cache, compute buffers, staging). Layers split over several GPUs run one
# after another, so a GPU tier has the bandwidth of one card and the size of all of them.
# Measure your own machine with benchmarks/bench_estimate.py and pass the JSON it writes.
MACHINES: dict[str, dict] = {
    "p40x3-288g": {
        # The GLM-5 study's machine. Its RAM rate is the one its measured speed (just under
        # 3 tokens/s) implies: 50 GB/s, 65% of the quad-channel peak.
        "description": "3x Tesla P40 (24 GiB, 347 GB/s each, 80% sustained), 288 GiB DDR4-2400 "
                       "quad-channel (76.8 GB/s peak, 65% sustained), ~3.5 GB/s NVMe",
        "tiers": [
            {"kind": "gpu", "size": "72GiB", "gb_per_s": 278, "reserve": "6GiB", "count": 3},
            {"kind": "ram", "size": "288GiB", "gb_per_s": 50, "reserve": "8GiB"},
            {"kind": "ssd", "size": "4TB", "gb_per_s": 3.5, "read_latency_s": 100e-6},
        ],
    },
    "rtx3090-128g": {
        # The study's proposed build. 2x 64 GiB DDR5-6400 on a current desktop sustains
        # ~90 GB/s of reads (88% of peak), the rate behind the study's 3.5 tokens/s.
        "description": "RTX 3090 (24 GiB, 936 GB/s, 80% sustained), 128 GiB DDR5-6400 dual-channel "
                       "(102.4 GB/s peak, 88% sustained), 7 GB/s PCIe 4.0 NVMe",
        "tiers": [
            {"kind": "gpu", "size": "24GiB", "gb_per_s": 749, "reserve": "2GiB"},
            {"kind": "ram", "size": "128GiB", "gb_per_s": 90, "reserve": "8GiB"},
            {"kind": "ssd", "size": "4TB", "gb_per_s": 7.0, "read_latency_s": 60e-6},
        ],
    },
    "rtx4090-192g": {
        "description": "RTX 4090 (24 GiB, 1008 GB/s), 192 GiB DDR5-5200 dual-channel "
                       "(83.2 GB/s peak), 7 GB/s NVMe; 80% of peaks sustained",
        "tiers": [
            {"kind": "gpu", "size": "24GiB", "gb_per_s": 806, "reserve": "2GiB"},
            {"kind": "ram", "size": "192GiB", "gb_per_s": 66.6, "reserve": "8GiB"},
            {"kind": "ssd", "size": "4TB", "gb_per_s": 7.0, "read_latency_s": 60e-6},
        ],
    },
    "ddr5-96g-cpu": {
        "description": "CPU only, 96 GiB DDR5-5600 dual-channel (89.6 GB/s peak, 80% sustained), 7 GB/s NVMe",
        "tiers": [
            {"kind": "ram", "size": "96GiB", "gb_per_s": 71.7, "reserve": "6GiB"},
            {"kind": "ssd", "size": "2TB", "gb_per_s": 7.0, "read_latency_s": 60e-6},
        ],
    },
    "epyc-12ch-768g": {
        "description": "EPYC server, 768 GiB DDR5-4800 12-channel (460.8 GB/s peak, 80% sustained), "
                       "2x 7 GB/s NVMe striped",
        "tiers": [
            {"kind": "ram", "size": "768GiB", "gb_per_s": 368.6, "reserve": "16GiB"},
            {"kind": "ssd", "size": "8TB", "gb_per_s": 14.0, "read_latency_s": 60e-6},
        ],
    },
    "m1-max-64g": {
        "description": "MacBook Pro M1 Max, 64 GiB unified (400 GB/s, 80% sustained), ~5 GB/s SSD",
        "tiers": [
            {"kind": "unified", "size": "64GiB", "gb_per_s": 320, "reserve": "12GiB"},
            {"kind": "ssd", "size": "2TB", "gb_per_s": 5.0, "read_latency_s": 40e-6},
        ],
    },
    "m4-pro-64g": {
        "description": "Mac mini M4 Pro, 64 GiB unified (273 GB/s, 80% sustained), ~5 GB/s SSD",
        "tiers": [
            {"kind": "unified", "size": "64GiB", "gb_per_s": 218, "reserve": "12GiB"},
            {"kind": "ssd", "size": "2TB", "gb_per_s": 5.0, "read_latency_s": 40e-6},
        ],
    },
    "m3-max-128g": {
        "description": "MacBook Pro M3 Max, 128 GiB unified (400 GB/s, 80% sustained), ~6 GB/s SSD",
        "tiers": [
            {"kind": "unified", "size": "128GiB", "gb_per_s": 320, "reserve": "16GiB"},
            {"kind": "ssd", "size": "4TB", "gb_per_s": 6.0, "read_latency_s": 40e-6},
        ],
    },
    "m4-max-128g": {
        "description": "MacBook Pro M4 Max, 128 GiB unified (546 GB/s, 80% sustained), ~6 GB/s SSD",
        "tiers": [
            {"kind": "unified", "size": "128GiB", "gb_per_s": 437, "reserve": "16GiB"},
            {"kind": "ssd", "size": "4TB", "gb_per_s": 6.0, "read_latency_s": 40e-6},
        ],
    },
    "m2-ultra-192g": {
        "description": "Mac Studio M2 Ultra, 192 GiB unified (800 GB/s, 80% sustained), ~6 GB/s SSD",
        "tiers": [
            {"kind": "unified", "size": "192GiB", "gb_per_s": 640, "reserve": "16GiB"},
            {"kind": "ssd", "size": "4TB", "gb_per_s": 6.0, "read_latency_s": 40e-6},
        ],
    },
    "m3-ultra-512g": {
        "description": "Mac Studio M3 Ultra, 512 GiB unified (819 GB/s, 80% sustained), ~6 GB/s SSD",
        "tiers": [
            {"kind": "unified", "size": "512GiB", "gb_per_s": 655, "reserve": "24GiB"},
            {"kind": "ssd", "size": "8TB", "gb_per_s": 6.0, "read_latency_s": 40e-6},
        ],
    },
}
