"""TileLang kernels (CUDA only). Import only behind ``tilelang_available()``: tilelang is an
optional dependency (``loongforge-kernels[tilelang]``) and needs a GPU to compile."""
