"""mbsec: a mutual-TLS Modbus/TCP Security proxy for plant DMZs."""

__version__ = "0.1.0"
