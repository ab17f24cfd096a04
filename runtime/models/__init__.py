"""muxtune.runtime.models"""
