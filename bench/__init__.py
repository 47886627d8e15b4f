"""The benchmarks; importing the package chooses the CPU BLAS before any benchmark imports mlx
(`AIP_CPU_BLAS`, as the service does)."""

from service.models.blas import install_hook

install_hook()
