"""Cryptographic formats and building blocks that know no HTTP: the AWS Encryption SDK message
format (esdk/) and the key hierarchy of branch keys (hierarchy/)."""
