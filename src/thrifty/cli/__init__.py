"""The thin CLI over the library: parse, build configs, call thrifty."""
