from .teacher_agreement import TeacherAgreementMetric

__all__ = ['TeacherAgreementMetric']
