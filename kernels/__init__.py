"""muxtune.kernels"""
