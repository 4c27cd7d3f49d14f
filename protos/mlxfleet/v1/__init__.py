"""mlxfleet.v1: the agent <-> coordinator contract. Generated code: see protos/generate.sh."""
