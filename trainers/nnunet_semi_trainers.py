"""Re-exports the nnunet-semi trainers for nnU-Net's trainer discovery (nnUNet_extTrainer).
Keep this file free of code: nnU-Net imports it as a top-level module and then forgets it."""
from nnunet_semi.methods.crossmatch import (CrossMatchTrainer, CrossMatchTrainer_annealedTau,  # noqa: F401
                                            CrossMatchTrainer_paper, CrossMatchTrainer_paperAnnealedTau,
                                            CrossMatchTrainer_presentClassDice, CrossMatchTrainer_rampUp,
                                            CrossMatchTrainer_released, CrossMatchTrainer_svda)
from nnunet_semi.methods.mean_teacher import (MeanTeacherTrainer, MeanTeacherTrainer_confCE,  # noqa: F401
                                              MeanTeacherTrainer_cutmix, MeanTeacherTrainer_ema999,
                                              MeanTeacherTrainer_exportTeacher, MeanTeacherTrainer_fromSupervised,
                                              MeanTeacherTrainer_released, MeanTeacherTrainer_svda,
                                              MeanTeacherTrainer_weight2)
from nnunet_semi.methods.supervised import SupervisedBaselineTrainer, SupervisedBaselineTrainer_svda  # noqa: F401
from nnunet_semi.methods.reciprocal_learning import (ReciprocalLearningTrainer,  # noqa: F401
                                                     ReciprocalLearningTrainer_exportTeacher,
                                                     ReciprocalLearningTrainer_fromSupervised,
                                                     ReciprocalLearningTrainer_released,
                                                     ReciprocalLearningTrainer_warmup)
from nnunet_semi.methods.aggregating_decoupling import (AggregatingDecouplingTrainer,  # noqa: F401
                                                        AggregatingDecouplingTrainer_normDifficulty,
                                                        AggregatingDecouplingTrainer_released,
                                                        AggregatingDecouplingTrainer_svda,
                                                        AggregatingDecouplingTrainer_thetaUnlabeled)
