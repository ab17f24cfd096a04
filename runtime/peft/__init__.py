"""muxtune.runtime.peft"""
