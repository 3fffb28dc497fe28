"""Test tiers. `python -m pytest -q -m "not slow"` is the quick tier a contributor runs while editing; the
full suite (the README's test command, what CI runs) includes the `slow` tests.

`slow` marks tests that launch processes or train for more than a few seconds: every test of the modules in
SLOW_MODULES (end-to-end launches, experiment runs, sharding in subprocesses, benchmarks, sweeps), every
`network` test (it may fetch a wheel), the process-launching tests in SLOW_TESTS, the tests in SLOW_TRAINING
(those whose parametrisations together compiled or trained for 1.5 s or more on 2 CPU cores, measured with
`python -m pytest -m "not slow" --durations=0`) and tests marked `@pytest.mark.slow` where they are defined.
"""

import pytest

SLOW_MODULES = {
    "test_launch", "test_readme", "test_failures", "test_sharding", "test_real_experiments", "test_benchmarks",
    "test_sweep", "test_nonconvex",
}
SLOW_TESTS = {                                   # tests of otherwise quick modules that launch processes
    "test_config_file_and_arg_errors_are_one_line", "test_cli_error_writes_nothing",
    "test_second_process_is_refused_and_stale_lock_cleared", "test_sigterm_mid_run_then_resume_is_bit_identical",
    "test_cli_resume_under_another_config_exits_2_with_the_fields",
    "test_failed_method_exits_nonzero_is_not_finished_and_keeps_the_others",
    "test_sigterm_stops_a_sweep_with_75_and_the_resume_is_bit_identical",
    "test_sigterm_stops_the_nonconvex_run_with_75_and_the_resume_is_bit_identical",
    "test_every_route_failing_says_where_to_put_the_files", "test_second_load_reads_the_cache",
    "test_unknown_task_and_every_route_failing",
}

SLOW_TRAINING = {                                # quick modules' tests that compile or train for >= 1.5 s in all
    "test_anchors_router_rate_moves_the_routers_and_the_default_does_not",
    "test_attention_projections_equal_a_hand_written_model",
    "test_aux_loss_is_added_to_the_objective_and_recorded",
    "test_balance_loss_moves_a_collapsed_router_toward_uniform_use",
    "test_bert_encoder_equals_a_hand_written_model_with_mixed_routers",
    "test_bfloat16_backbone_with_float32_adapters_trains",
    "test_bfloat16_input_with_float32_params",
    "test_bfloat16_nnx_backbone_trains_float32_adapters",
    "test_blockwise_matches_eq6",
    "test_cellwise_matches_eq8",
    "test_checkpointer_round_trip_and_resume_in_process",
    "test_chunked_evaluation_equals_whole_split",
    "test_context_as_labels_one_hot_or_embedding_agree",
    "test_corrupt_checkpoint_falls_back_to_the_previous_step_then_retrains",
    "test_different_seeds_differ",
    "test_dora_matches_its_dense_formula",
    "test_dtype_fields_from_strings",
    "test_each_group_is_printed_once_with_its_count",
    "test_einsum_attention_equals_a_hand_written_model_in_linen_and_nnx",
    "test_eval_every_runs_several_epochs_per_call_and_matches_every_epoch",
    "test_eval_train_rows_evaluates_the_training_prefix_only",
    "test_every_adapter_starts_as_the_frozen_model",
    "test_expert_dropout_drops_and_renormalises_only_with_the_rng",
    "test_fast_form_equals_einsum_oracle",
    "test_fast_form_equals_oracle_in_bfloat16",
    "test_finite_blow_up_is_flagged_as_diverged",
    "test_float_labels_as_one_vector_are_refused",
    "test_frozen_group_and_schedule_and_clipping_work_with_groups",
    "test_gate_diagnostics_equal_a_direct_computation",
    "test_group_multiplier_and_weight_decay_reach_exactly_their_leaves",
    "test_hard_routing_has_one_nonzero_gate_and_trains_the_router",
    "test_history_and_tensorboard_stream_during_training_without_duplicates_after_resume",
    "test_key_map_and_forward_pass_match_a_direct_transcription",
    "test_lemma1_blockwise_router_couples_every_output_block",
    "test_lemma1_routing_jacobian_is_block_diagonal",
    "test_localized_equals_cellwise_with_one_expert",
    "test_logistic_probe_converges_to_the_regularised_optimum",
    "test_lora_matches_eq1",
    "test_melora_is_block_diagonal",
    "test_merged_model_equals_the_adapted_model",
    "test_model_step_benchmark_smoke",
    "test_nnx_adapter_modules_have_the_linen_params_and_outputs",
    "test_nnx_block_equals_a_hand_written_model",
    "test_nnx_optimizer_over_the_adapter_type_trains_only_the_adapters_and_extras",
    "test_no_groups_is_bit_identical_to_a_rule_that_changes_nothing",
    "test_no_per_example_dense_update_in_forward_or_backward",
    "test_one_lora_per_task_is_the_selected_tasks_lora",
    "test_optimizer_from_config_schedule_and_clipping",
    "test_per_entry_learning_rates",
    "test_per_task_lora_merges_per_task_and_refuses_a_missing_context",
    "test_public_api_context_routed_cellwise_moe_on_a_plain_nnx_attention_model",
    "test_router_initializers",
    "test_router_losses_and_usage_by_group_match_a_hand_count",
    "test_router_losses_with_an_all_zero_mask_are_zero_not_nan",
    "test_router_outputs_are_sown_and_collected",
    "test_router_traces_give_the_same_losses_and_diagnostics_as_linen",
    "test_routing_diagnostics_refuse_group_ids_beyond_num_groups",
    "test_saved_adapter_reloads_to_identical_outputs_and_refuses_another_model",
    "test_scanned_layers_are_refused_by_name_and_remat_layers_adapted",
    "test_small_layer_einsum_form_equals_oracle",
    "test_steps_per_epoch_streams_passes_and_resumes_identically",
    "test_task_aligned_start_routes_context_t_to_expert_t_mod_e",
    "test_task_ids_outside_context_dim_are_an_error",
    "test_token_weighted_losses_and_group_usage",
    "test_touches_exactly_the_matched_layers",
    "test_traced_task_ids_outside_context_dim_give_nan_not_uniform_routing",
    "test_trainable_extras_are_saved_and_loaded_without_being_named_again",
    "test_trainable_extras_stay_trainable_and_are_counted_apart",
    "test_training_is_deterministic_and_learns",
    "test_training_loss_is_recorded_without_aux",
    "test_unusable_checkpoint_dir_and_failed_save_warn_and_keep_training",
    "test_vmapped_entries_with_different_base_rates_keep_their_groups",
    "test_vmapped_seeds_equal_each_seed_alone",
    "test_z_loss_and_entropies",
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1]
    name = item.originalname if hasattr(item, "originalname") else item.name
    if module in SLOW_MODULES or name in SLOW_TESTS or name in SLOW_TRAINING or item.get_closest_marker("network") is not None:
      item.add_marker(pytest.mark.slow)
