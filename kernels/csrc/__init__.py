"""The C++ sources of the switch kernels, shipped as package data (``shira_runtime.kernels.csrc``)."""
