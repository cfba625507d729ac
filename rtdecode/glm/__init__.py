"""The online single-trial GLM: HRF, design, incremental LSS/LSA betas, normalisation.

A beta here means one thing everywhere: the effect size of one trial in a GLM with a Glover HRF, a
cosine drift basis, the six motion parameters and an intercept, fitted by OLS or AR(1)-prewhitened
least squares exactly as nilearn's ``FirstLevelModel`` fits it. The live daemon and calibration both
use :class:`rtdecode.glm.online.OnlineGLM`, so offline and online betas agree by construction.
"""
