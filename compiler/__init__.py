"""muxtune.compiler"""
