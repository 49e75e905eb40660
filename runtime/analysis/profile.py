"""Warm-start profiles, for the offline tools: everything lives in ``golem.runtime.profiles``
(the live runtime reads and records profiles there) and is re-exported here under its older
name."""

from golem.runtime.profiles import (  # noqa: F401  (re-exported)
    LOCK_TIMEOUT_S,
    MAX_EXPERTS,
    PROFILE_FILENAME,
    PROFILE_FORMAT,
    Profile,
    ProfileDamaged,
    ProfileError,
    load_profile,
    load_saved_profile,
    load_warm_source,
    model_identity,
    profile_dir_for,
    profile_from_counts,
    profile_from_traces,
    profile_path,
    random_warm_start,
    record_profile,
    record_run,
    same_model,
    save_profile,
)
