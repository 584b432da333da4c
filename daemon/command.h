/* command.h: MQTT messages on command topics become CoAP requests to devices, one at a time per
 * device; responses (or errors) go back to MQTT. */
#ifndef C2M_COMMAND_H
#define C2M_COMMAND_H

#include <coap3/coap.h>

struct config;
struct device;
struct mqtt_in;

int command_init(const struct config *c);
void command_set_config(const struct config *c);
void command_on_message(const struct mqtt_in *m);
void command_device_up(struct device *d);
void command_device_down(struct device *d, const char *reason);
int command_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcvd);
int command_nack(coap_session_t *s, const coap_pdu_t *sent, coap_nack_reason_t reason);
/* Answers every queued command with an error and frees everything. */
void command_shutdown(void);
size_t command_queued(void);

#endif
