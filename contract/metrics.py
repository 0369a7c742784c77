"""What a rank may put in a metric point, agreed by the ranks (trainers.reporting) and the control plane
(orchestrator.api.trainer_service, which refuses more): bounds that keep a point small, so that a batch of
them fits in one gRPC message and the metrics table stays bounded per step."""

# The top singular values of one point (MetricPoint.sigma_max): at most this many parameters
# (trainers.mup.reported_matrices picks evenly spaced blocks when a model has more matrices), each named by
# its global name of at most MAX_PARAMETER_NAME characters.
MAX_SIGMA_PARAMETERS = 64
MAX_PARAMETER_NAME = 64
