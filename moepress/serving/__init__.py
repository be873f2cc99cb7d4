"""moepress's vLLM plugin: serves every moepress output kind with vLLM's own model classes and fused-MoE layers.

vLLM finds it through the `vllm.general_plugins` entry point (`moepress.serving.plugin:register`), so
`vllm serve OUT` works with moepress installed. This package is the only place moepress imports vllm;
importing `moepress.serving` itself imports nothing from vllm.
"""
